"""Tokenizers and the special tokens every run reserves up front.

Two sources:

* a pretrained checkpoint's own tokenizer (`load_pretrained_tokenizer`), with
  the special tokens added once; the model's embeddings are resized to match
  once, when the model is built, never mid-run;
* for the offline tiny default, a byte-level BPE trained on the run's task
  data (`train_bpe_tokenizer`) and saved with the run.

Special tokens: one answer separator, an end-of-sequence token that doubles as
padding (labels mask padding out, so they never clash), and `max_tasks`
generation tokens `<|task_i|>`, one per position in the task sequence. All are
reserved before training starts so a sequence of 100+ tasks never needs an
embedding resize; they stay frozen like the rest of the backbone, unless
`model.token_rows=trained` gives each task the rows it uses first (or the
method trains the whole backbone: lamol, finetune).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# PreTrainedTokenizerFast (transformers 5's TokenizersBackend) imports without torch; AutoTokenizer imports
# torch and the model configurations (~1.8 s more), so it is imported only for a checkpoint's own tokenizer
from transformers import PreTrainedTokenizerFast

from dmea_dist.errors import ConfigError
from dmea_dist.offline import OFFLINE

ANS_TOKEN = "<|ans|>"
EOS_TOKEN = "<|endoftext|>"


def task_token(index: int) -> str:
    """The generation token of the task at position `index` of the sequence."""
    return f"<|task_{index}|>"


@dataclass(frozen=True)
class SpecialTokenIds:
    ans: int
    eos: int
    pad: int
    tasks: tuple[int, ...]  # tasks[i] = id of task_token(i)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokenIds:
        ids = [tokenizer.convert_tokens_to_ids(ANS_TOKEN), tokenizer.eos_token_id]
        n_tasks = sum(1 for tok in tokenizer.get_vocab() if tok.startswith("<|task_"))
        tasks = tuple(tokenizer.convert_tokens_to_ids([task_token(i) for i in range(n_tasks)]))
        unk = tokenizer.unk_token_id
        # the answer separator and task tokens, not eos: GPT-2's unk token *is* its eos <|endoftext|>
        reserved = (ids[0], *tasks)
        if None in reserved or (unk is not None and unk in reserved):
            raise ValueError("tokenizer lacks the reserved special tokens; build it with train_bpe_tokenizer "
                             "or load_pretrained_tokenizer")
        return cls(ans=ids[0], eos=ids[1], pad=tokenizer.pad_token_id, tasks=tasks)


def _special_tokens(max_tasks: int) -> list[str]:
    return [EOS_TOKEN, ANS_TOKEN] + [task_token(i) for i in range(max_tasks)]


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, max_tasks: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with the reserved special tokens (offline, seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = _special_tokens(max_tasks)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None)
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    return fast


def load_pretrained_tokenizer(name_or_path: str, *, max_tasks: int, key: str = "model.pretrained"):
    """The checkpoint's own tokenizer plus the reserved special tokens; `key`: where the name came from (errors)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **OFFLINE)
    except (OSError, ValueError) as err:  # transformers' "not a folder, not a hub name", no files, unknown type
        raise ConfigError(not_loadable(key, name_or_path, "tokenizer", err)) from None
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        # transformers 5 builds an empty tokenizer from a folder that has a config.json but no tokenizer files
        raise ConfigError(f"{key}={name_or_path!r}: its tokenizer has no vocabulary ({len(tokenizer)} tokens); the "
                          f"folder needs the checkpoint's tokenizer files (tokenizer.json, or vocab.json and "
                          f"merges.txt), as tokenizer.save_pretrained(folder) writes them")
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GPT-2's eos is already <|endoftext|>; add the answer separator and task tokens.
    tokenizer.add_special_tokens({"additional_special_tokens": _special_tokens(max_tasks)[1:]})
    return tokenizer


def not_loadable(key: str, name_or_path: str, what: str, err: Exception) -> str:
    """The message for a checkpoint named by `key` (model.pretrained, --tokenizer) whose `what` cannot be loaded.

    The hint depends on what the name is: a folder that exists (files missing), a path that does not (a typo:
    downloading would not help), or a hub name (fetch it into the local cache beforehand)."""
    said = " ".join(str(err).split())[:200]  # transformers' messages span lines: one line, as every error here
    head = f"{key}={name_or_path!r}: its {what} cannot be loaded ({type(err).__name__}: {said}); "
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return head + ("the folder needs what save_pretrained writes there (config.json, the weights, the "
                       "tokenizer files)")
    if _is_path(name_or_path):
        return head + (f"there is no folder {folder.resolve()}; give the folder written by save_pretrained "
                       f"(config.json, weights, tokenizer files), or a hub name already in the local cache")
    return head + (f"no folder {folder.resolve()} exists and the local Hugging Face cache has no complete copy of {name_or_path!r}: a "
                   f"run downloads nothing, so fetch it beforehand (e.g. `hf download {name_or_path}` where the hub "
                   f"is reachable), or give a local folder written by save_pretrained")


def _is_path(name: str) -> bool:
    """A name only a path can be: absolute, ~ or . first, or more parts than a hub's `org/name`."""
    return name.startswith(("/", "~", ".")) or name.count("/") > 1 or "\\" in name


def load_tokenizer(directory: str | Path):
    """Load a tokenizer saved with a run (`tokenizer.save_pretrained(directory)`).

    The BPE of `train_bpe_tokenizer` is a plain fast tokenizer, loaded as one: without AutoTokenizer, whose
    import costs the driver's input check ~2 s before Ray starts. Any other class (a checkpoint's own
    tokenizer, saved with a run or shipped to a worker) goes through AutoTokenizer as before.
    """
    config = Path(directory) / "tokenizer_config.json"
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):  # no readable config: AutoTokenizer says what is wrong with the folder
        cls = None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
