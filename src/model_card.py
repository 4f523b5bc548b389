"""The model card written with every export: ``hf/README.md``, readable by ``huggingface_hub``.

What a reader of a model needs and a run knows: the base model, the objective and its key
settings, the data (sources and fingerprints from ``run.json``), the steps and tokens trained,
the final validation (and benchmark) metrics, the command that reproduces it, the license if the
base model's card names one. :func:`push_to_hub` uploads the folder for connected users.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

CARD_FILENAME = "README.md"
RECORD_FILENAME = "run.json"  # what src.callbacks.RunRecord writes (imported from here there)
# model settings shown in the card (when set): the ones that make an objective what it is
KEY_SETTINGS = (
    "loss_type",
    "beta",
    "label_smoothing",
    "reference",
    "desirable_weight",
    "undesirable_weight",
    "center_rewards_coefficient",
    "divergence",
    "temperature",
    "nll_weight",
    "teacher_name_or_path",
    "scheduler",
    "warmup",
    "lm_head",
)
DATA_SETTINGS = ("format", "chat_template", "train_on", "packing", "max_length", "batch_size")


def model_card_text(
    run_dir: Path,
    metrics: dict[str, float],
    global_step: int,
    license: str | None = None,
) -> str:
    """The card of the run in ``run_dir`` (its ``config.yaml`` and ``run.json``), as Markdown
    with YAML metadata; ``metrics``: the final logged values (``val/*``, ``eval/*``,
    ``train/tokens_seen``)."""
    from huggingface_hub import ModelCard, ModelCardData

    config = _read_yaml(run_dir / "config.yaml")
    record = _read_json(run_dir / RECORD_FILENAME)
    model = config.get("model") or {}
    init = model.get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    objective = str(model.get("class_path", "unknown")).rpartition(".")[2]
    base = init.get("model_name_or_path")
    scratch = bool(init.get("from_scratch"))
    license = license or base_license(base)
    sources = ((record.get("data") or {}).get("sources") or {}).get("train") or []
    fingerprints = (record.get("data") or {}).get("fingerprints") or {}
    hub_datasets = [s.get("path") for s in sources if isinstance(s, dict) and s.get("hub")]
    card_data = ModelCardData(
        base_model=None if scratch or not base or Path(str(base)).exists() else str(base),
        datasets=[d for d in hub_datasets if d] or None,
        license=license,
        library_name="peft" if init.get("lora") else "transformers",
        pipeline_tag="text-generation" if objective != "RewardModule" else "text-classification",
        tags=["lightning", objective],
        model_name=f"{run_dir.parent.name}/{run_dir.name}",
    )
    settings = {k: init[k] for k in KEY_SETTINGS if init.get(k) is not None}
    optimizer = init.get("optimizer") or {}
    if optimizer:
        settings["optimizer"] = str(optimizer.get("class_path", "")).rpartition(".")[2]
        settings.update(
            {
                k: v
                for k, v in (optimizer.get("init_args") or {}).items()
                if k in ("lr", "weight_decay")
            }
        )
    if init.get("lora"):
        lora = init["lora"]
        settings["lora"] = {k: lora.get(k) for k in ("r", "alpha", "dropout", "target_modules")}
    lines = [
        f"# {run_dir.parent.name}/{run_dir.name}",
        "",
        f"Trained with `{model.get('class_path')}` "
        + (
            f"from the configuration of `{base}` (random initialisation)."
            if scratch
            else f"from `{base}`."
        ),
        "",
        "## Objective",
        "",
        *(f"- {k}: `{json.dumps(v, default=str)}`" for k, v in settings.items()),
        "",
        "## Data",
        "",
        *(f"- {k}: `{json.dumps(data.get(k), default=str)}`" for k in DATA_SETTINGS if k in data),
        *(f"- train source: `{json.dumps(s, default=str)}`" for s in sources),
        *(f"- {split} fingerprint: `{value}`" for split, value in fingerprints.items()),
        "",
        "## Training",
        "",
        f"- optimizer steps: {global_step}",
    ]
    if "train/tokens_seen" in metrics:
        lines.append(f"- tokens trained on (non-padding): {int(metrics['train/tokens_seen']):,}")
    lines += [f"- precision: `{record.get('precision')}`", f"- devices: {record.get('world_size')}"]
    final = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "eval/"))}
    lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in final.items()] or ["| (none logged) | |"]
    git = record.get("git") or {}
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"git checkout {git.get('commit', 'unknown')}",
        f"python train.py fit --config {shlex.quote(str(run_dir / 'config.yaml'))}",
        "```",
        "",
        f"The original command: `{record.get('command', 'unknown')}`"
        + (" (the tree had uncommitted changes)" if git.get("dirty") is True else ""),
        "",
    ]
    body = "\n".join(lines)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}"))


def write_model_card(
    out: Path,
    run_dir: Path,
    metrics: dict[str, float],
    global_step: int,
    license: str | None = None,
) -> Path:
    """Write :func:`model_card_text` to ``out/README.md``."""
    path = Path(out) / CARD_FILENAME
    path.write_text(model_card_text(run_dir, metrics, global_step, license), encoding="utf-8")
    return path


def base_license(base: Any) -> str | None:
    """The license in the base model's own card, when it is a local folder that has one."""
    if not base:
        return None
    card = Path(str(base)) / CARD_FILENAME
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # noqa: BLE001 - a malformed card only costs the license line
        return None


def push_to_hub(folder: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create ``repo_id`` (if new) and upload ``folder`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload from train.py",
    )
    return str(getattr(info, "commit_url", info))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


__all__ = ["base_license", "model_card_text", "push_to_hub", "write_model_card"]
