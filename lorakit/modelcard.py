"""The ``README.md`` model card written into every output folder.

It follows the Hugging Face model card layout: YAML front matter (``library_name: peft``,
``base_model``, ``tags``) and a Markdown body that describes what was merged and how, embeds the
manifest, lists the sources with their sha256 and shows how to load the adapter. The card holds
no time or host-specific path, so the same inputs give the same card.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

import lorakit
from lorakit.peft_config import output_alpha
from lorakit.plan import Plan
from lorakit.provenance import PROVENANCE_NAME
from lorakit.serving import VLLM_MAX_LORA_RANKS, serving_report

__all__ = ["CARD_NAME", "render_model_card"]

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"

# A Hub model id: "name" or "owner/name". Anything else (a local path) is left out of the front
# matter, because the Hub rejects a base_model that is not a model id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# PEFT task_type → the transformers Auto class that loads the base model for it.
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _fenced(text: str, language: str) -> str:
    """Fence ``text`` with more backticks than any run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _manifest_text(plan: Plan) -> tuple[str, bool]:
    """Return the manifest as written, or its normalised form when the file changed since it was loaded.

    The flag is True for the file as written.
    """
    manifest = plan.manifest
    try:
        raw = manifest.path.read_bytes()
    except OSError as error:
        logger.warning("%s: cannot reread the manifest for the model card (%s); embedding its normalised form", manifest.path, error)
        raw = None
    if raw is not None and hashlib.sha256(raw).hexdigest() == manifest.sha256:
        return raw.decode("utf-8"), True
    if raw is not None:
        logger.warning("%s changed while the merge ran; the model card embeds the manifest as it was loaded", manifest.path)
    return yaml.safe_dump(manifest.normalised(), sort_keys=False, allow_unicode=True), False


def _front_matter(base_model: str | None, methods: list[str]) -> str:
    data: dict[str, Any] = {"library_name": "peft"}
    if base_model and _HUB_ID.match(base_model):
        data["base_model"] = base_model
    data["tags"] = ["lorakit", "merge", "lora", *methods]
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def _merge_section(plan: Plan, seed: int | None) -> str:
    rows = []
    for group in plan.groups:
        parameters = ", ".join(f"{key}={value}" for key, value in group.spec.to_dict().items() if key != "method")
        rows.append(
            [
                group.projection,
                group.spec.method + (f" ({parameters})" if parameters else ""),
                group.spec.origin,
                len(group.module_paths),
                "/".join(map(str, group.source_ranks)),
                group.output_rank,
                output_alpha(group.output_rank, group.output_scale),
            ]
        )
    header = ["projection", "method", "chosen by", "modules", "source ranks", "rank", "lora_alpha"]
    lines = [
        "## How it was merged",
        "",
        _table(header, rows),
        "",
        f"Output dtype: {str(plan.output_dtype).removeprefix('torch.')}.",
    ]
    if seed is not None:
        lines.append(f"Seed: {seed} (random draws come from generators seeded by this value and each module path).")
    if plan.excluded:
        lines.append(f"Left out (not in `merge.include`): {', '.join(plan.excluded)}.")
    return "\n".join(lines)


def _serving_section(plan: Plan) -> str:
    report = serving_report(group.output_rank for group in plan.groups)
    if report["vllm_max_lora_rank"] is not None:
        advice = f"vLLM serves it with `--max-lora-rank {report['vllm_max_lora_rank']}` or larger."
    else:
        advice = (
            f"vLLM cannot serve it: ranks {', '.join(map(str, report['too_large']))} exceed {VLLM_MAX_LORA_RANKS[-1]}, "
            "the largest `--max-lora-rank` it accepts."
        )
    return f"## Serving\n\nThe largest module rank is {report['max_rank']}. {advice}"


def _sources_section(plan: Plan, source_hashes: Mapping[Path, str]) -> str:
    rows = []
    for index, (adapter, source) in enumerate(zip(plan.adapters, plan.manifest.sources)):
        written_path = plan.manifest.data["sources"][index]["path"]
        for path in adapter.files():
            rows.append([source.name, f"`{written_path}`", source.weight, path.name, f"`{source_hashes[path]}`"])
    header = ["source", "path (relative to the manifest)", "weight", "file", "sha256"]
    return "## Sources\n\n" + _table(header, rows)


def _usage_section(folder_name: str, base_model: str | None, task_type: str | None) -> str:
    auto_class = _AUTO_CLASSES.get(task_type or "", "AutoModel")
    base = base_model or "BASE_MODEL_ID"
    return f"""## Usage

With PEFT:

```python
from peft import PeftModel
from transformers import {auto_class}

base = {auto_class}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/{folder_name}")  # this folder or its Hub repository id
```

With transformers alone (PEFT installed):

```python
from transformers import {auto_class}

model = {auto_class}.from_pretrained("{base}")
model.load_adapter("path/to/{folder_name}")
```

`lorakit verify path/to/{folder_name}` checks every file against the sha256 in `{PROVENANCE_NAME}`."""


def render_model_card(
    plan: Plan,
    seed: int | None,
    folder_name: str,
    config: Mapping[str, Any],
    files: Mapping[str, str],
    source_hashes: Mapping[Path, str],
) -> str:
    """Render the model card of one output folder.

    Args:
        plan: the executed plan.
        seed: the output's seed, or None when no method draws.
        folder_name: the output folder's name, for the loading examples.
        config: the output's adapter_config.json.
        files: sha256 of the output's adapter files, by file name.
        source_hashes: sha256 of every source file, by path.
    """
    manifest = plan.manifest
    base_model = config.get("base_model_name_or_path")
    methods = list(dict.fromkeys(group.spec.method for group in plan.groups))
    manifest_text, as_written = _manifest_text(plan)

    summary = (
        f"A LoRA adapter merged by lorakit {lorakit.__version__} from {len(plan.adapters)} PEFT LoRA adapters "
        f"with {', '.join(methods)}, over {sum(len(group.module_paths) for group in plan.groups)} modules."
    )
    if base_model:
        summary += f" Base model: `{base_model}`."
    file_rows = [[name, f"`{digest}`"] for name, digest in files.items()]

    sections = [
        _front_matter(base_model, methods),
        f"# {manifest.name}",
        *([manifest.description] if manifest.description else []),
        summary,
        _merge_section(plan, seed),
        _serving_section(plan),
        _sources_section(plan, source_hashes),
        "## Manifest\n\n"
        + ("The manifest as written" if as_written else "The manifest, normalised (the file changed during the run)")
        + f" (sha256 `{manifest.sha256}`):\n\n"
        + _fenced(manifest_text, "yaml"),
        "## Files\n\n" + _table(["file", "sha256"], file_rows) + f"\n\n`{PROVENANCE_NAME}` records how each file was made.",
        _usage_section(folder_name, base_model, config.get("task_type")),
    ]
    return "\n\n".join(section.rstrip("\n") for section in sections) + "\n"
