"""Fuzzing the manifest loader: any input ends in a Manifest or in lorakit's own error type.

Hypothesis feeds ``load_manifest`` random YAML documents, random token soup and random mutations
of the committed manifests (``manifests/*.yaml``, when the repository has them) and of the
corpus's valid manifests. A manifest that loads is also planned against real adapters. Every
error must be a ``LorakitError`` whose message names the manifest file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lorakit.errors import LorakitError, ManifestError
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan
from corpus_support import VALID, build_corpus_root

REPOSITORY = Path(__file__).resolve().parent.parent
BASES = sorted((REPOSITORY / "manifests").glob("*.yaml")) + VALID
BASE_TEXTS = [path.read_text(encoding="utf-8") for path in BASES]

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def recipes(base_model, tmp_path_factory) -> Path:
    """The corpus adapters, so that mutated manifests that still load can be planned too."""
    return build_corpus_root(base_model, tmp_path_factory.mktemp("fuzz")) / "recipes"


def check_loader(recipes: Path, text: str | bytes) -> None:
    """Load ``text`` as a manifest (and plan it when it loads); only LorakitError may escape."""
    path = recipes / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        manifest = load_manifest(path)
        event("loaded")
        plan = build_plan(manifest, device="cpu")
        event("planned")
        for adapter in plan.adapters:
            adapter.close()
    except LorakitError as error:
        event(type(error).__name__)
        assert str(path) in str(error), f"message without the file name: {error}"
        if isinstance(error, ManifestError):
            for message in error.messages:
                assert message.startswith(f"{path}:"), message


# --- Random YAML documents -------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.dates(),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.none()), children, max_size=4),
    ),
    max_leaves=20,
)
manifest_keys = ["version", "name", "description", "sources", "merge", "seeds", "output"]
merge_keys = ["method", "rank", "density", "majority_sign_method", "include", "rules", "projections", "modules_to_save"]
merge_like = st.dictionaries(
    st.sampled_from(merge_keys), st.one_of(values, st.sampled_from(["block", "random", "soups", "cat", 4, 8, "a"])), max_size=5
)
source_like = st.fixed_dictionaries(
    {"path": st.sampled_from(["../adapters/a", "../adapters/b", "../adapters/c", "../adapters/mts", "x", ""])},
    optional={"name": st.one_of(st.sampled_from(["a", "b", "mts"]), values), "weight": st.one_of(st.floats(), values)},
)
manifest_like = st.fixed_dictionaries(
    {},
    optional={
        "version": st.one_of(st.just(1), values),
        "sources": st.one_of(st.lists(source_like, max_size=3), values),
        "merge": st.one_of(merge_like, values),
        "seeds": st.one_of(st.lists(st.integers(min_value=-5, max_value=2**65), max_size=3), values),
        "output": st.one_of(st.fixed_dictionaries({"path": st.sampled_from(["../output/x", ".", "../adapters/a"])}), values),
        "name": values,
    },
)


@FUZZ
@given(document=st.one_of(values, manifest_like))
def test_fuzz_random_documents(recipes, document):
    check_loader(recipes, yaml.safe_dump(document, allow_unicode=True))


# Pieces of YAML syntax, so that random text exercises the parser's error paths.
TOKENS = [
    "version: 1", "sources:", "merge:", "output:", "  - path: ../adapters/a", "  method: block", "  rank: 4",
    "  path: ../output/x", ":", "- ", "  ", "\t", "\n", "&a ", "*a", "<<: *a", "!!binary AAA", "!!python/object:os.system",
    "!!float x", "!!int 0x", "2024-13-45", "{", "}", "[", "]", ",", "---", "...", "? ", "|", ">", "'", '"', "#", "%YAML 1.1",
    "~", ".nan", ".inf", "1" * 4400, "\x00", "\ufeff", "\ud800",
]


@FUZZ
@given(pieces=st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=30))
def test_fuzz_token_soup(recipes, pieces):
    check_loader(recipes, "".join(pieces))


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_raw_bytes(recipes, data):
    check_loader(recipes, data)


# --- Mutations of real manifests -----------------------------------------------------------


@st.composite
def line_mutations(draw) -> str:
    """Delete, repeat, swap, re-indent or splice lines of a base manifest."""
    lines = draw(st.sampled_from(BASE_TEXTS)).splitlines()
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not lines:
            break
        index = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        action = draw(st.sampled_from(["delete", "repeat", "swap", "indent", "dedent", "insert", "replace"]))
        if action == "delete":
            del lines[index]
        elif action == "repeat":
            lines.insert(index, lines[index])
        elif action == "swap":
            other = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[index], lines[other] = lines[other], lines[index]
        elif action == "indent":
            lines[index] = draw(st.sampled_from(["  ", "\t", " "])) + lines[index]
        elif action == "dedent":
            lines[index] = lines[index].lstrip()
        elif action == "insert":
            lines.insert(index, draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=20))))
        else:
            head, _, _ = lines[index].partition(":")
            lines[index] = f"{head}: {draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=10)))}"
    return "\n".join(lines) + "\n"


@FUZZ
@given(text=line_mutations())
def test_fuzz_line_mutations(recipes, text):
    check_loader(recipes, text)


@FUZZ
@given(base=st.sampled_from(BASE_TEXTS), edits=st.lists(st.tuples(st.floats(0, 1), st.text(max_size=3)), min_size=1, max_size=5))
def test_fuzz_character_mutations(recipes, base, edits):
    text = base
    for position, replacement in edits:
        index = min(int(position * len(text)), len(text))
        text = text[:index] + replacement + text[index + 1 :]
    check_loader(recipes, text)


NAMES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "o_proj", "a", "b", "c", "mts", "first", "block", "random", "soups", "cat", "*", "*.q_proj", "model.layers.1.*"]


def plausible(value) -> st.SearchStrategy:
    if isinstance(value, bool) or value is None:
        return values
    if isinstance(value, int):
        return st.integers(min_value=-2, max_value=20)
    if isinstance(value, float):
        return st.floats(min_value=-2, max_value=2)
    if isinstance(value, str):
        return st.sampled_from(NAMES + ["../adapters/a", "../adapters/c", "../adapters/mts", "../output/y"])
    if isinstance(value, list):
        return st.lists(st.one_of(st.sampled_from(NAMES), st.integers(min_value=0, max_value=3)), max_size=4)
    return st.dictionaries(st.sampled_from(NAMES + merge_keys), st.one_of(st.sampled_from(NAMES), st.integers(1, 9)), max_size=3)


def _paths(value, prefix=()):
    """Every key path of a nested structure of dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, prefix + (index,))


@st.composite
def structure_mutations(draw) -> str:
    """Replace, delete or add one value somewhere in a parsed base manifest."""
    data = yaml.safe_load(draw(st.sampled_from(BASE_TEXTS)))
    path = draw(st.sampled_from(list(_paths(data))[1:]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["tweak", "tweak", "replace", "delete", "add"]))
    if action == "tweak":
        # A plausible value of the same kind, to reach the checks behind the schema.
        parent[path[-1]] = draw(plausible(parent[path[-1]]))
    elif action == "replace":
        parent[path[-1]] = draw(values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.one_of(st.sampled_from(manifest_keys + merge_keys), st.text(max_size=8)))] = draw(values)
    else:
        parent.append(draw(values))
    return yaml.safe_dump(data, allow_unicode=True)


@FUZZ
@given(text=structure_mutations())
def test_fuzz_structure_mutations(recipes, text):
    check_loader(recipes, text)


def test_fuzz_bases_load(recipes):
    """The unmutated valid manifests load and plan, so the mutations start from working input."""
    for text in BASE_TEXTS[len(BASES) - len(VALID) :]:
        path = recipes / "fuzz.yaml"
        path.write_text(text)
        plan = build_plan(load_manifest(path), device="cpu")
        assert plan.groups
        assert all(math.isfinite(group.output_scale) for group in plan.groups)
