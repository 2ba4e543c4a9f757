"""MetaEmbed in mteb at any budget.

`mteb_model(model_or_folder, (r_q, r_c))` gives the mteb model (a `MultiVectorWrapper` over a sentence-transformers
`MultiVectorEncoder`, the way mteb runs late-interaction models) that encodes r_q query and r_c candidate vectors,
declares MetaEmbed's modalities (text and image, so text-to-image and document tasks run) and carries the budget
in its name, revision and `experiment_kwargs`: results of different budgets never share an mteb cache entry.

    import mteb
    from transformers import AutoModel
    from metaembed.evaluation.mteb_bridge import mteb_model

    model = AutoModel.from_pretrained("me/my-metaembed", trust_remote_code=True)   # loaded once
    tasks = mteb.get_tasks(tasks=["VidoreDocVQARetrieval", "VidoreTabfquadRetrieval"])
    for budget in [(1, 1), (4, 8), (16, 64)]:
        results = mteb.evaluate(mteb_model(model, budget, name="me/my-metaembed"), tasks)
"""

from __future__ import annotations

import os
from typing import Any

from modeling_metaembed import MetaEmbedModel, MetaEmbedPreTrainedModel
from scoring_metaembed import check_num_vectors

from ..fingerprint import model_fingerprint

# Where MetaEmbed declares what it reads (also written to the saved folder's sentence_bert_config.json).
MODALITIES = sorted(MetaEmbedPreTrainedModel.input_modalities)


def _base_name(name_or_path: str | None) -> str:
    """mteb names are "org/model": a Hub id as it is, a local folder as "local/<folder name>"."""
    if not name_or_path:
        return "local/metaembed"
    if os.path.exists(name_or_path):
        return f"local/{os.path.basename(os.path.abspath(name_or_path))}"
    return name_or_path if "/" in name_or_path else f"local/{name_or_path}"


def mteb_model(
    model: MetaEmbedModel | str | os.PathLike,
    budget: tuple[int, int],
    *,
    name: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    **load_kwargs: Any,
):
    """An mteb model that evaluates `model` at `budget`.

    Args:
        model: a `MetaEmbedModel` (shared, not copied: build one per budget from one loaded model), or a folder /
            Hub id loaded as `MultiVectorEncoder(model, trust_remote_code=True, **load_kwargs)`.
        budget: (r_q, r_c), within the model's vector counts.
        name: the mteb model name ("org/model"); default the Hub id, or "local/<folder name>". The budget is
            appended: "org/model-budget-4x8".
        revision: default the first 12 hex digits of `metaembed.fingerprint.model_fingerprint` (config, processor
            settings, every weight; so another training run of the same folder is another entry), computed once
            per model object; the budget is appended too.
        device: passed to `MultiVectorEncoder`.

    Returns:
        a `mteb.models.MultiVectorWrapper` for `mteb.evaluate`.
    """
    from mteb.models import MultiVectorWrapper
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from sentence_transformers import MultiVectorEncoder

    from sentence_transformers_metaembed import MetaEmbedModule

    if isinstance(model, (str, os.PathLike)):
        encoder = MultiVectorEncoder(os.fspath(model), trust_remote_code=True, device=device, **load_kwargs)
        metaembed = encoder[0].model
        name_or_path = os.fspath(model)
    elif hasattr(model, "encode_queries") and hasattr(model, "config"):  # also the remote-code class
        metaembed, name_or_path = model, model.name_or_path
        encoder = None
    else:
        raise TypeError(f"model must be a MetaEmbedModel, a folder or a Hub id, got {type(model).__name__}")
    if not isinstance(budget, (tuple, list)) or len(budget) != 2:
        raise ValueError(f"budget must be a pair (r_q, r_c), got {budget!r}")
    num_query_vectors = check_num_vectors(budget[0], metaembed.config.num_query_vectors, "budget r_q")
    num_candidate_vectors = check_num_vectors(budget[1], metaembed.config.num_candidate_vectors, "budget r_c")
    module = MetaEmbedModule(metaembed, num_query_vectors, num_candidate_vectors)
    if encoder is None:
        encoder = MultiVectorEncoder(modules=[module], device=device, similarity_fn_name="maxsim")
    else:  # the loaded encoder keeps its saved prompts and settings; only the vector counts change
        encoder[0].query_num_vectors, encoder[0].document_num_vectors = num_query_vectors, num_candidate_vectors
    wrapper = MultiVectorWrapper(encoder)
    suffix = f"budget-{num_query_vectors}x{num_candidate_vectors}"
    wrapper.mteb_model_meta = ModelMeta.create_empty(
        overwrites={
            "name": f"{name or _base_name(name_or_path)}-{suffix}",
            "revision": f"{revision or model_fingerprint(metaembed)[:12]}-{suffix}",
            "loader": None,
            "modalities": MODALITIES,
            "model_type": ["late-interaction"],
            "similarity_fn_name": ScoringFunction.MAX_SIM,
            "framework": ["PyTorch", "Sentence Transformers"],
            "embed_dim": metaembed.config.output_dim,
            "experiment_kwargs": {"r_q": num_query_vectors, "r_c": num_candidate_vectors},
        }
    )
    return wrapper


__all__ = ["MODALITIES", "mteb_model"]
