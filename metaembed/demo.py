"""The end-to-end demo: train a small MetaEmbed from scratch on rendered scenes, with and without MMR, and
measure retrieval quality, index size and scoring time at every budget.

The task is built so that fine detail matters: a scene is a 3 x 3 board, each cell empty or holding a coloured
disc; a query names one object ("red top left", as text) or shows it alone in its cell (as an image), and every
scene with that object in that cell is relevant. One small vector cannot describe nine cells at once, so more
vectors should help, and MMR should make the first vector useful on its own. The board's cells are tinted by
row and column, as a printed board would be: where a disc is shows in its pixels, which a backbone trained from
scratch learns in minutes (Qwen-VL's rotary positions alone took it far longer).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from scoring_metaembed import MMR_BUDGETS

from .evaluation import BudgetResult, RetrievalDataset, evaluate
from .evaluation.metrics import import_pytrec_eval
from .training import MMR_GROUPS

CELL_PIXELS = 28  # one merged Qwen-VL patch per cell
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 180),
    "orange": (240, 130, 20),
}
ROW_NAMES = ("top", "middle", "bottom")
COLUMN_NAMES = ("left", "center", "right")
GRID = 3
Position = tuple[int, int]
Scene = dict[Position, str | None]  # cell -> colour name, None = empty


def cell_tint(row: int, column: int) -> tuple[int, int, int]:
    """The board's pale background colour of a cell: red rises with the row, green with the column."""
    return (200 + 25 * row, 200 + 25 * column, 230)


@dataclass(frozen=True)
class SceneTask:
    """Scene generation; `fill` is the chance that a cell holds an object."""

    fill: float = 0.85
    colors: tuple[str, ...] = tuple(PALETTE)

    @property
    def positions(self) -> list[Position]:
        return [(row, column) for row in range(GRID) for column in range(GRID)]

    def draw(self, scene: Scene) -> Image.Image:
        """The scene as an RGB image of GRID * 28 pixels square, on the tinted board."""
        image = Image.new("RGB", (GRID * CELL_PIXELS, GRID * CELL_PIXELS))
        canvas = ImageDraw.Draw(image)
        for row, column in self.positions:
            left, top = column * CELL_PIXELS, row * CELL_PIXELS
            canvas.rectangle((left, top, left + CELL_PIXELS - 1, top + CELL_PIXELS - 1), fill=cell_tint(row, column))
        for (row, column), color in scene.items():
            if color is not None:
                left, top = column * CELL_PIXELS + 4, row * CELL_PIXELS + 4
                canvas.ellipse((left, top, left + 20, top + 20), fill=PALETTE[color])
        return image

    def describe(self, color: str, position: Position) -> str:
        return f"{color} {ROW_NAMES[position[0]]} {COLUMN_NAMES[position[1]]}"

    def query(self, color: str, position: Position, as_text: bool) -> str | Image.Image:
        """A query for one object: its description, or an image of it alone in its cell."""
        return self.describe(color, position) if as_text else self.draw({position: color})

    def random_scene(self, rng: random.Random, forbidden: dict[Position, set[str]] | None = None) -> Scene:
        scene: Scene = {}
        for position in self.positions:
            allowed = [color for color in self.colors if color not in (forbidden or {}).get(position, ())]
            scene[position] = rng.choice(allowed) if allowed and rng.random() < self.fill else None
        return scene

    def training_batch(self, rng: random.Random, batch_size: int, text_fraction: float) -> list[dict]:
        """`batch_size` rows {"query", "positive"} with no false negatives: the targets (cell, colour) are
        distinct and no scene shows another row's target in that cell, so every in-batch negative is one."""
        targets = rng.sample([(position, color) for position in self.positions for color in self.colors], batch_size)
        forbidden: dict[Position, set[str]] = {}
        for position, color in targets:
            forbidden.setdefault(position, set()).add(color)
        rows = []
        for position, color in targets:
            scene = self.random_scene(rng, forbidden)
            scene[position] = color
            rows.append(
                {"query": self.query(color, position, rng.random() < text_fraction), "positive": self.draw(scene)}
            )
        return rows


class SceneTrainingBatches(Dataset):
    """`num_batches` training batches of `batch_size` rows, each built free of false negatives and made on
    demand from (seed, index). Each item is a whole batch (train with per-device batch size 1; the collator
    flattens it), so the Trainer's shuffling cannot mix rows of different batches."""

    def __init__(
        self, task: SceneTask, num_batches: int, batch_size: int, seed: int, text_fraction: float = 0.7
    ) -> None:
        self.task, self.num_batches, self.batch_size = task, num_batches, batch_size
        self.seed, self.text_fraction = seed, text_fraction

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> list[dict]:
        rng = random.Random(self.seed * 1_000_003 + index)
        return self.task.training_batch(rng, self.batch_size, self.text_fraction)


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
    scenes = [task.random_scene(rng) for _ in range(num_candidates)]
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
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    temperature: float = 0.05
    embedding_dim: int = 16
    hidden_size: int = 64
    # std of the random backbone's weights: ~1/sqrt(hidden) keeps image features from vanishing in the meta
    # tokens' states (at transformers' usual 0.02 training sat at chance for hundreds of steps)
    initializer_range: float = 0.1
    text_fraction: float = 0.5  # of training queries; the rest are images
    num_candidates: int = 1000
    num_queries: int = 1000
    seed: int = 0


def save_demo_backbone(folder: str, settings: DemoSettings) -> str:
    """The random tiny Qwen2.5-VL backbone the demo trains from (one merged image token per board cell), its
    weights drawn from `settings.seed`."""
    from .testing import save_tiny_backbone

    return save_tiny_backbone(
        folder,
        "qwen2_5_vl",
        seed=settings.seed,
        max_image_tokens=GRID * GRID,
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
        SceneTask(), settings.steps, settings.batch_size, settings.seed, settings.text_fraction
    )
    return train_metaembed(
        model,
        batches,
        output_dir,
        groups=MMR_GROUPS if mmr else MMR_GROUPS[-1:],
        temperature=settings.temperature,
        lora_rank=None,
        max_steps=settings.steps,
        per_device_train_batch_size=1,  # one pre-built batch of settings.batch_size rows
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
    dataset = retrieval_dataset(evaluation_set(SceneTask(), settings.num_candidates, settings.num_queries))
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
