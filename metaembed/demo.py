"""The end-to-end demo: train a small MetaEmbed from scratch on rendered scenes, with and without MMR, and
measure retrieval quality, index size and scoring time at every budget.

The task is built so that every budget buys something: a scene is a 5 x 5 board, each cell empty or holding an
object (one of 6 colours x 3 shapes); a query names one object and its cell ("red square c4", as text) or shows
it alone in its cell (as an image), and every scene with that object in that cell is relevant (about 1 in 21). The
embedding is narrow (8 dimensions), so a vector holds about one cell well: (16, 64) has a vector for each of the
25 cells, (8, 16) must share vectors between cells, (4, 8) more so, and quality rises at each budget; MMR makes the
first vectors useful on their own. The board's cells are tinted by row and column, as a printed board would be:
where an object is shows in its pixels. Training starts on the board's top-left corner, cropped (2 x 2, then
3 x 3, then 4 x 4 cells), and goes on with whole boards: on whole boards from the first step the random tiny
backbone sat at chance for most of the run. Evaluation scenes come from a part of all scenes (by a hash of their
content) that training never shows.
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
    shapes: tuple[str, ...] = SHAPES

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

    def region(self, side: int | None) -> list[Position]:
        """The cells of the top-left `side` x `side` corner of the board (all cells for None)."""
        side = self.grid if side is None else side
        return [(row, column) for row, column in self.positions if row < side and column < side]

    def random_scene(
        self, rng: random.Random, forbidden: dict[Position, set[str]] | None = None, side: int | None = None
    ) -> Scene:
        """A random board; with `side`, objects only in its top-left `side` x `side` corner (the rest empty)."""
        scene: Scene = dict.fromkeys(self.positions)
        objects = self.objects
        for position in self.region(side):
            allowed = [name for name in objects if name not in (forbidden or {}).get(position, ())]
            scene[position] = rng.choice(allowed) if allowed and rng.random() < self.fill else None
        return scene

    def is_held_out(self, scene: Scene) -> bool:
        """Whether a scene belongs to the evaluation's part of all scenes (one in HELD_OUT_EVERY, by a hash of
        its content): training never shows one, evaluation shows only those."""
        key = ";".join(scene.get(position) or "-" for position in self.positions)
        return zlib.crc32(key.encode()) % HELD_OUT_EVERY == 0

    def training_scenes(
        self, rng: random.Random, batch_size: int, side: int | None = None
    ) -> list[tuple[Position, str, Scene]]:
        """`batch_size` (cell, object, scene) targets with no false negatives: the targets are distinct and no
        scene shows another row's target in that cell, so every in-batch negative is one; no scene is held out.
        With `side`, targets and objects lie in the board's top-left `side` x `side` corner only."""
        targets = rng.sample([(position, name) for position in self.region(side) for name in self.objects], batch_size)
        forbidden: dict[Position, set[str]] = {}
        for position, name in targets:
            forbidden.setdefault(position, set()).add(name)
        rows = []
        for position, name in targets:
            scene = None
            while scene is None or self.is_held_out(scene):
                scene = {**self.random_scene(rng, forbidden, side), position: name}
            rows.append((position, name, scene))
        return rows

    def training_batch(
        self, rng: random.Random, batch_size: int, text_fraction: float, side: int | None = None
    ) -> list[dict]:
        """`training_scenes` as rows {"query", "positive"}; a query is text with chance `text_fraction`. With
        `side`, images show only the board's top-left `side` x `side` cells: cropped, not drawn with the rest
        empty, since the empty cells' image tokens drown the few that differ (whole-size corner boards sat at
        chance for one seed of two)."""
        pixels = (side or self.grid) * self.cell_pixels

        def shown(image: str | Image.Image) -> str | Image.Image:
            return image if isinstance(image, str) or side is None else image.crop((0, 0, pixels, pixels))

        return [
            {
                "query": shown(self.query(name, position, rng.random() < text_fraction)),
                "positive": shown(self.draw(scene)),
            }
            for position, name, scene in self.training_scenes(rng, batch_size, side)
        ]


Curriculum = tuple[tuple[float, int], ...]  # (fraction of the steps, corner side): the boards' corner until then


class SceneTrainingBatches(Dataset):
    """`num_batches` training batches of `batch_size` rows, each built free of false negatives and made on
    demand from (seed, index). Each item is a whole batch (train with per-device batch size 1; the collator
    flattens it), so shuffling could not mix rows of different batches. With a `curriculum`, batch `index`
    (= the training step, when sampled in order) is drawn from the board's top-left corner of the side that the
    first stage with `index < fraction * num_batches` gives, and from whole boards after the last stage."""

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
        """The corner side batch `index` is drawn from (None: the whole board)."""
        return next((side for fraction, side in self.curriculum if index < fraction * self.num_batches), None)

    def __getitem__(self, index: int) -> list[dict]:
        rng = random.Random(self.seed * 1_000_003 + index)
        return self.task.training_batch(rng, self.batch_size, self.text_fraction, self.side(index))


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
    steps: int = 1200
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
    # the boards' top-left 2 x 2 cells for the first 10 % of the steps, 3 x 3 to 20 %, 4 x 4 to 30 %, then whole
    # boards: from a 2 x 2 corner the loss leaves chance within ~120 steps, from whole boards not in 1,000
    curriculum: Curriculum = ((0.1, 2), (0.2, 3), (0.3, 4))


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


def train_demo_model(backbone_dir: str, output_dir: str, settings: DemoSettings, mmr: bool):
    """A MetaEmbed (R_q = 16, R_c = 64) trained from the random backbone, every parameter, with MMR over the
    paper's five budgets or (without MMR) only the largest one."""
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


def run_demo(settings: DemoSettings, output_dir: str | None = None) -> tuple[list[BudgetResult], list[BudgetResult]]:
    """Train with and without MMR, reload each saved Hub folder through AutoModel, evaluate every budget,
    print the table and write `quality_vs_budget.png` into `output_dir`."""
    from transformers import AutoModel

    import_pytrec_eval()  # the evaluation's metrics: fail now, not after training both models
    output_dir = output_dir or tempfile.mkdtemp(prefix="metaembed-demo-")
    backbone_dir = save_demo_backbone(os.path.join(output_dir, "backbone"), settings)
    dataset = retrieval_dataset(evaluation_set(settings.task, settings.num_candidates, settings.num_queries))
    results = {}
    for mmr in (True, False):
        name = "metaembed-mmr" if mmr else "metaembed-no-mmr"
        start = time.perf_counter()
        train_demo_model(backbone_dir, os.path.join(output_dir, name), settings, mmr)
        print(f"trained {name} in {time.perf_counter() - start:.0f} s", flush=True)
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
