"""The end-to-end demo: train a small MetaEmbed from scratch on rendered scenes, with and without MMR, and
measure retrieval quality, index size and scoring time at every budget.

The task is built so that every budget buys something: a scene is a 5 x 5 board, each cell empty or holding an
object (one of 6 colours x 2 shapes); a query names one object and its cell ("red square c4", as text) or shows
it alone in its cell (as an image), and every scene with that object in that cell is relevant (about 1 in 14). The
embedding is narrow (8 dimensions), so a vector holds about one cell well: (16, 64) has a vector for each of the
25 cells, (8, 16) must share vectors between cells, (4, 8) more so, and quality rises at each budget; MMR makes the
first vectors useful on their own. The board's cells are tinted by row and column, as a printed board would be:
where an object is shows in its pixels. Training starts on small windows of the boards, cropped (2 x 2, then
3 x 3, then 4 x 4 cells, anywhere on the board), and goes on with whole boards: on whole boards from the first
step the random tiny backbone sat at chance for most of the run. Evaluation scenes come from a part of all scenes
(by a hash of their content) that training never shows.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
import zlib
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from scoring_metaembed import MMR_BUDGETS

from .evaluation import BudgetResult, RetrievalDataset, evaluate
from .evaluation.metrics import import_pytrec_eval
from .training import MMR_GROUPS

PATCH_PIXELS = 14  # a Qwen-VL vision patch; 2 x 2 patches merge into one language-model token
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 180),
    "orange": (240, 130, 20),
}
SHAPES = ("disc", "square", "triangle")
COLUMN_LETTERS = "abcdefgh"
HELD_OUT_EVERY = 10  # one scene in 10 (by content) is reserved for evaluation
Position = tuple[int, int]
Scene = dict[Position, str | None]  # cell -> object ("red square"), None = empty


def cell_tint(row: int, column: int, grid: int) -> tuple[int, int, int]:
    """The board's pale background colour of a cell: red rises with the row, green with the column."""
    step = 90 // max(1, grid - 1)
    return (160 + step * row, 160 + step * column, 235)


@dataclass(frozen=True)
class SceneTask:
    """Scene generation: a `grid` x `grid` board; each cell holds an object with chance `fill`, an object being
    one of `colors` x `shapes`."""

    grid: int = 5
    cell_pixels: int = 28
    fill: float = 0.85
    colors: tuple[str, ...] = tuple(PALETTE)
    # 12 objects: fewer classes per cell to learn in the 1,000 steps that fit in 10 minutes (1,000-step runs with
    # 18 objects, at two threads per training, came out undertrained)
    shapes: tuple[str, ...] = SHAPES[:2]

    @property
    def positions(self) -> list[Position]:
        return [(row, column) for row in range(self.grid) for column in range(self.grid)]

    @property
    def objects(self) -> list[str]:
        return [f"{color} {shape}" for color in self.colors for shape in self.shapes]

    def draw(self, scene: Scene) -> Image.Image:
        """The scene as an RGB image of grid * 28 pixels square, on the tinted board."""
        cell = self.cell_pixels
        image = Image.new("RGB", (self.grid * cell, self.grid * cell))
        canvas = ImageDraw.Draw(image)
        for row, column in self.positions:
            left, top = column * cell, row * cell
            canvas.rectangle((left, top, left + cell - 1, top + cell - 1), fill=cell_tint(row, column, self.grid))
        margin = cell // 7
        for (row, column), name in scene.items():
            if name is None:
                continue
            color, shape = name.split()
            left, top = column * cell + margin, row * cell + margin
            right, bottom = left + cell - 2 * margin - 1, top + cell - 2 * margin - 1
            if shape == "disc":
                canvas.ellipse((left, top, right, bottom), fill=PALETTE[color])
            elif shape == "square":
                canvas.rectangle((left + 1, top + 1, right - 1, bottom - 1), fill=PALETTE[color])
            else:
                canvas.polygon(((left + right) / 2, top, left, bottom, right, bottom), fill=PALETTE[color])
        return image

    def describe(self, name: str, position: Position) -> str:
        """ "red square c2": the object, then its cell as column letter and row number (row 1 at the top)."""
        return f"{name} {COLUMN_LETTERS[position[1]]}{position[0] + 1}"

    def query(self, name: str, position: Position, as_text: bool) -> str | Image.Image:
        """A query for one object: its description, or an image of it alone in its cell."""
        return self.describe(name, position) if as_text else self.draw({position: name})

    def region(self, window: Window | None) -> list[Position]:
        """The cells of a (top, left, side) window of the board: `side` x `side` cells from row `top`, column
        `left` (all cells for None)."""
        top, left, side = window or (0, 0, self.grid)
        return [(row, column) for row, column in self.positions if 0 <= row - top < side and 0 <= column - left < side]

    def random_scene(
        self, rng: random.Random, forbidden: dict[Position, set[str]] | None = None, window: Window | None = None
    ) -> Scene:
        """A random board; with a `window`, objects only in its cells (the rest empty)."""
        scene: Scene = dict.fromkeys(self.positions)
        objects = self.objects
        for position in self.region(window):
            allowed = [name for name in objects if name not in (forbidden or {}).get(position, ())]
            scene[position] = rng.choice(allowed) if allowed and rng.random() < self.fill else None
        return scene

    def is_held_out(self, scene: Scene) -> bool:
        """Whether a scene belongs to the evaluation's part of all scenes (one in HELD_OUT_EVERY, by a hash of
        its content): training never shows one, evaluation shows only those."""
        key = ";".join(scene.get(position) or "-" for position in self.positions)
        return zlib.crc32(key.encode()) % HELD_OUT_EVERY == 0

    def training_scenes(
        self, rng: random.Random, batch_size: int, window: Window | None = None
    ) -> list[tuple[Position, str, Scene]]:
        """`batch_size` (cell, object, scene) targets with no false negatives: the targets are distinct and no
        scene shows another row's target in that cell, so every in-batch negative is one; no scene is held out.
        With a `window`, targets and objects lie in its cells only."""
        targets = rng.sample(
            [(position, name) for position in self.region(window) for name in self.objects], batch_size
        )
        forbidden: dict[Position, set[str]] = {}
        for position, name in targets:
            forbidden.setdefault(position, set()).add(name)
        rows = []
        for position, name in targets:
            scene = None
            while scene is None or self.is_held_out(scene):
                scene = {**self.random_scene(rng, forbidden, window), position: name}
            rows.append((position, name, scene))
        return rows

    def training_batch(
        self, rng: random.Random, batch_size: int, text_fraction: float, window: Window | None = None
    ) -> list[dict]:
        """`training_scenes` as rows {"query", "positive"}; a query is text with chance `text_fraction`. With a
        `window`, images show only its cells: cropped, not drawn with the rest empty, since the empty cells' image
        tokens drown the few that differ (whole-size boards with objects in a corner sat at chance for one seed of
        two)."""
        if window is None:
            box = None
        else:
            top, left, side = (number * self.cell_pixels for number in window)
            box = (left, top, left + side, top + side)

        def shown(image: str | Image.Image) -> str | Image.Image:
            return image if isinstance(image, str) or box is None else image.crop(box)

        return [
            {
                "query": shown(self.query(name, position, rng.random() < text_fraction)),
                "positive": shown(self.draw(scene)),
            }
            for position, name, scene in self.training_scenes(rng, batch_size, window)
        ]


Window = tuple[int, int, int]  # (top row, left column, side) of a square part of the board
Curriculum = tuple[tuple[float, int], ...]  # (fraction of the steps, window side) stages


class SceneTrainingBatches(Dataset):
    """`num_batches` training batches of `batch_size` rows, each built free of false negatives and made on
    demand from (seed, index). Each item is a whole batch (train with per-device batch size 1; the collator
    flattens it), so shuffling could not mix rows of different batches. With a `curriculum`, batch `index`
    (= the training step, when sampled in order) is drawn from a window of the board (`window`), of the side
    that the first stage with `index < fraction * num_batches` gives, and from whole boards after the last stage."""

    def __init__(
        self,
        task: SceneTask,
        num_batches: int,
        batch_size: int,
        seed: int,
        text_fraction: float = 0.7,
        curriculum: Curriculum = (),
    ) -> None:
        self.task, self.num_batches, self.batch_size = task, num_batches, batch_size
        self.seed, self.text_fraction, self.curriculum = seed, text_fraction, curriculum

    def __len__(self) -> int:
        return self.num_batches

    def side(self, index: int) -> int | None:
        """The window side batch `index` is drawn from (None: the whole board)."""
        return next((side for fraction, side in self.curriculum if index < fraction * self.num_batches), None)

    def window(self, index: int, rng: random.Random) -> Window | None:
        """Batch `index`'s window: its stage's side, anywhere on the board (so every cell's tint is seen early)."""
        side = self.side(index)
        if side is None:
            return None
        return rng.randrange(self.task.grid - side + 1), rng.randrange(self.task.grid - side + 1), side

    def __getitem__(self, index: int) -> list[dict]:
        rng = random.Random(self.seed * 1_000_003 + index)
        window = self.window(index, rng)
        return self.task.training_batch(rng, self.batch_size, self.text_fraction, window)


@dataclass
class EvaluationSet:
    """Held-out scenes (candidates) and object queries with their relevance `[num_queries, num_candidates]`."""

    candidates: list[Image.Image]
    queries: list[str | Image.Image]
    relevant: torch.Tensor
    query_is_text: list[bool] = field(default_factory=list)


def evaluation_set(task: SceneTask, num_candidates: int, num_queries: int, seed: int = 12345) -> EvaluationSet:
    """Queries ask for objects present in some held-out scene; two of three are text, one an image."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    while len(scenes) < num_candidates:
        scene = task.random_scene(rng)
        if task.is_held_out(scene):
            scenes.append(scene)
    targets: list[tuple[str, Position]] = []
    while len(targets) < num_queries:
        scene = rng.choice(scenes)
        filled = [position for position, color in scene.items() if color is not None]
        if filled:
            position = rng.choice(filled)
            targets.append((scene[position], position))
    is_text = [index % 3 != 2 for index in range(num_queries)]
    return EvaluationSet(
        candidates=[task.draw(scene) for scene in scenes],
        queries=[task.query(color, position, text) for (color, position), text in zip(targets, is_text)],
        relevant=torch.tensor([[scene[position] == color for scene in scenes] for color, position in targets]),
        query_is_text=is_text,
    )


# R@1 (a relevant scene ranked first: precision@1) and capped recall@10 (relevant in the top 10 / min(10,
# number relevant), BEIR's R_cap@10), so 1.0 is reachable although many scenes are relevant to each query.
DEMO_METRICS = ("precision@1", "recall_cap@10")


def retrieval_dataset(data: EvaluationSet, name: str = "scenes") -> RetrievalDataset:
    """The evaluation set as a `RetrievalDataset` (every relevant scene has grade 1) for `metaembed.evaluation`."""
    width = len(str(len(data.candidates)))
    candidate_ids = [f"scene-{number:0{width}d}" for number in range(len(data.candidates))]
    query_ids = [f"query-{number:0{width}d}" for number in range(len(data.queries))]
    qrels = {
        query: {candidate_ids[position]: 1 for position in row.nonzero().flatten().tolist()}
        for query, row in zip(query_ids, data.relevant)
    }
    return RetrievalDataset(
        name, query_ids, data.queries, candidate_ids, data.candidates, qrels=qrels, metrics=DEMO_METRICS
    )


@dataclass
class DemoSettings:
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    temperature: float = 0.05
    # narrow, so that a few vectors cannot hold a whole board (at 8 on a 3 x 3 board the curve sat near 1.0 from
    # (4, 8) on; at 4 or 6 every budget scored lower, the curve no steeper)
    embedding_dim: int = 8
    hidden_size: int = 64
    # std of the random backbone's weights: ~1/sqrt(hidden) keeps image features from vanishing in the meta
    # tokens' states (at transformers' usual 0.02 training sat at chance for hundreds of steps)
    initializer_range: float = 0.1
    text_fraction: float = 0.5  # of training queries; the rest are images
    num_candidates: int = 1000
    num_queries: int = 2000
    seed: int = 0
    task: SceneTask = field(default_factory=SceneTask)
    # 2 x 2 windows of the boards (anywhere) for the first 13 % of the steps, 3 x 3 to 26 %, 4 x 4 to 39 %, then
    # whole boards: from 2 x 2 the loss leaves chance within ~120 steps, from whole boards not in 1,000
    curriculum: Curriculum = ((0.13, 2), (0.26, 3), (0.39, 4))


def save_demo_backbone(folder: str, settings: DemoSettings) -> str:
    """The random tiny Qwen2.5-VL backbone the demo trains from (one merged image token per board cell)."""
    from .testing import save_tiny_backbone

    image_tokens_per_side = -(-settings.task.grid * settings.task.cell_pixels // (2 * PATCH_PIXELS))
    return save_tiny_backbone(
        folder,
        "qwen2_5_vl",
        seed=settings.seed,
        max_image_tokens=image_tokens_per_side**2,
        hidden_size=settings.hidden_size,
        initializer_range=settings.initializer_range,
    )


def train_demo_model(backbone_dir: str, output_dir: str, settings: DemoSettings, mmr: bool, **training_arguments):
    """A MetaEmbed (R_q = 16, R_c = 64) trained from the random backbone, every parameter, with MMR over the
    paper's five budgets or (without MMR) only the largest one. `training_arguments`: further
    `transformers.TrainingArguments` fields (e.g. `disable_tqdm`)."""
    from modeling_metaembed import MetaEmbedModel

    from .training import train_metaembed

    torch.manual_seed(settings.seed)
    model = MetaEmbedModel.from_backbone(
        backbone_dir, 16, 64, embedding_dim=settings.embedding_dim, processor_kwargs={"prompt_style": "simple"}
    )
    batches = SceneTrainingBatches(
        settings.task, settings.steps, settings.batch_size, settings.seed, settings.text_fraction, settings.curriculum
    )
    return train_metaembed(
        model,
        batches,
        output_dir,
        groups=MMR_GROUPS if mmr else MMR_GROUPS[-1:],
        temperature=settings.temperature,
        lora_rank=None,
        # Rows are drawn on demand from the package's own generator: checking them all up front would render
        # every training image twice.
        check_rows=False,
        max_steps=settings.steps,
        per_device_train_batch_size=1,  # one pre-built batch of settings.batch_size rows
        train_sampling_strategy="sequential",  # batch index = step, which the curriculum follows
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.steps // 20),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, settings.steps // 10),
        dataloader_pin_memory=False,
        seed=settings.seed,
        **training_arguments,
    )


def format_table(with_mmr: list[BudgetResult], without_mmr: list[BudgetResult]) -> str:
    lines = [
        "| budget | R@1 MMR | R@1 no-MMR | R@10 MMR | R@10 no-MMR | index bytes/candidate | scoring ms/query (MMR) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mmr, plain in zip(with_mmr, without_mmr):
        r1, r10 = DEMO_METRICS
        lines.append(
            f"| {mmr.budget} | {mmr.metrics[r1]:.3f} | {plain.metrics[r1]:.3f} | {mmr.metrics[r10]:.3f} | "
            f"{plain.metrics[r10]:.3f} | {mmr.index_bytes_per_candidate} | {mmr.scoring_ms_per_query:.4f} |"
        )
    return "\n".join(lines)


def save_plot(with_mmr: list[BudgetResult], without_mmr: list[BudgetResult], path: str) -> None:
    """Quality vs budget, both trainings, as PNG (matplotlib, from the [train] extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"({r_q},{r_c})" for r_q, r_c in (result.budget for result in with_mmr)]
    figure, axis = plt.subplots(figsize=(6, 4))
    for results, name in ((with_mmr, "MMR"), (without_mmr, "no MMR")):
        axis.plot(labels, [result.metrics[DEMO_METRICS[0]] for result in results], marker="o", label=f"R@1, {name}")
        axis.plot(
            labels, [result.metrics[DEMO_METRICS[1]] for result in results], marker="s", ls="--", label=f"R@10, {name}"
        )
    axis.set_xlabel("budget (r_q, r_c)")
    axis.set_ylabel("capped recall")
    axis.set_title("MetaEmbed demo: quality vs budget")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _train_with_one_thread(backbone_dir: str, output_dir: str, settings: DemoSettings, mmr: bool) -> float:
    """`train_demo_model` in a worker process with one torch thread; returns the training's seconds."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    # no progress bar: the two trainings run side by side and their bars would overwrite each other
    train_demo_model(backbone_dir, output_dir, settings, mmr, disable_tqdm=True)
    return time.perf_counter() - start


def run_demo(settings: DemoSettings, output_dir: str | None = None) -> tuple[list[BudgetResult], list[BudgetResult]]:
    """Train with and without MMR, reload each saved Hub folder through AutoModel, evaluate every budget,
    print the table and write `quality_vs_budget.png` into `output_dir`.

    The two models train side by side, each in its own process with one torch thread: on 2 cores that takes
    about half the time of training them one after the other with 2 threads each (a model this small gains
    little from a second thread), and the trained weights do not depend on the machine's core count (a training
    run's path depends on the float rounding of its thread count). The workers are spawned, so a script that
    calls this must do so under `if __name__ == "__main__":` (`metaembed demo` does)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from transformers import AutoModel

    import_pytrec_eval()  # the evaluation's metrics: fail now, not after training both models
    output_dir = output_dir or tempfile.mkdtemp(prefix="metaembed-demo-")
    backbone_dir = save_demo_backbone(os.path.join(output_dir, "backbone"), settings)
    names = {True: "metaembed-mmr", False: "metaembed-no-mmr"}
    print(f"training {names[True]} and {names[False]} side by side ({settings.steps} steps each)", flush=True)
    # spawn, not fork: the parent has torch's thread pools running
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        trainings = {
            mmr: pool.submit(_train_with_one_thread, backbone_dir, os.path.join(output_dir, name), settings, mmr)
            for mmr, name in names.items()
        }
        for mmr, training in trainings.items():
            print(f"trained {names[mmr]} in {training.result():.0f} s", flush=True)
    dataset = retrieval_dataset(evaluation_set(settings.task, settings.num_candidates, settings.num_queries))
    results = {}
    for mmr, name in names.items():
        model = AutoModel.from_pretrained(os.path.join(output_dir, name), trust_remote_code=True)
        results[mmr] = evaluate(model, dataset, MMR_BUDGETS, batch_size=64)
    print(
        f"\n{settings.num_queries} queries (text and image) over {settings.num_candidates} held-out scenes; "
        "capped recall@k; float32 index:\n"
    )
    print(format_table(results[True], results[False]))
    plot_path = os.path.join(output_dir, "quality_vs_budget.png")
    save_plot(results[True], results[False], plot_path)
    print(f"\nplot: {plot_path}\nmodels: {output_dir}/metaembed-mmr, {output_dir}/metaembed-no-mmr")
    return results[True], results[False]
