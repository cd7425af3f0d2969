"""Text sources, deterministic splits, calibration windows and training blocks.

A *source* is one of:
  - a built-in offline corpus: `wiki` (100-article English Wikipedia excerpt
    shipped in gensim's test data, cleaned of markup), `news` (gensim's
    `lee_background.cor`, 300 Australian news articles), `pydoc` (the
    Python stdlib's help topics);
  - a local `.txt` file (documents separated by blank lines) or `.jsonl` file
    (one document per line, field `text`; or `prompt`/`response` for
    instruction data, trained in the tokenizer's chat template; or
    `prompt`/`completion` for plain continuations, trained exactly as
    lm-eval scores a multiple-choice answer);
  - `hf:NAME[:CONFIG]` — a Hugging Face dataset with a `text` column, for users
    who have the hub.

Splits are by document, deterministic (no seed): every 10th document is
held out, so the held-out text never leaks into training or calibration.
"""
from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SeftError, choices_hint

SPLITS = ("train", "heldout", "all")
HELDOUT_EVERY = 10


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")  # locate without importing gensim
    if spec is None or not spec.submodule_search_locations:
        raise SeftError("built-in corpora need the gensim package (pip install gensim==4.4.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


# --- Wikipedia markup cleaning -------------------------------------------------

_NESTED = [(re.compile(r"\{\{[^{}]*\}\}"), ""), (re.compile(r"\{\|[^{}]*?\|\}", re.S), "")]
_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;|&ndash;|&mdash;"), " "),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n\s*\n+"), "\n\n"),
]


def clean_wiki_markup(text: str) -> str:
    """Strip templates, tables, refs, links and formatting; keep the prose."""
    for _ in range(8):  # templates nest; peel them from the inside out
        before = text
        for pattern, repl in _NESTED:
            text = pattern.sub(repl, text)
        if text == before:
            break
    for pattern, repl in _SUBS:
        text = pattern.sub(repl, text)
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if not ln.startswith(("{", "|", "!", "}"))]
    return "\n".join(lines).strip()


def _wiki_documents() -> list[str]:
    path = next(_gensim_test_data().glob("enwiki-latest-pages-articles1.xml-*-shortened.bz2"), None)
    if path is None:
        raise SeftError("gensim's Wikipedia excerpt was not found; reinstall gensim==4.4.0")
    docs: list[str] = []
    with bz2.open(path) as fh:
        for _, elem in ET.iterparse(fh):
            if elem.tag.endswith("}page"):
                ns = next((c.text for c in elem if c.tag.endswith("}ns")), "0")
                rev = next((c for c in elem if c.tag.endswith("}revision")), None)
                body = "" if rev is None else next((c.text or "" for c in rev if c.tag.endswith("}text")), "")
                if ns == "0" and body and not body.lstrip().lower().startswith("#redirect"):
                    cleaned = clean_wiki_markup(body)
                    if len(cleaned) > 200:
                        docs.append(cleaned)
                elem.clear()
    return docs


def _news_documents() -> list[str]:
    path = _gensim_test_data() / "lee_background.cor"
    if not path.exists():
        raise SeftError(f"{path} not found; reinstall gensim==4.4.0")
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def _pydoc_documents() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]


BUILTINS: dict[str, Callable[[], list[str]]] = {
    "wiki": _wiki_documents,
    "news": _news_documents,
    "pydoc": _pydoc_documents,
}


# --- loading ---------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SeftError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def _local_documents(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if d.strip()]
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
        if rows and all("text" in r for r in rows):
            return [str(r["text"]) for r in rows]
        if rows and all("prompt" in r and ("response" in r or "completion" in r) for r in rows):
            return [f"{r['prompt']}\n{r['response']}" if "response" in r else f"{r['prompt']}{r['completion']}"
                    for r in rows]
        keys = sorted(set().union(*(r.keys() for r in rows))) if rows else []
        raise SeftError(f"{path}: each line needs a 'text' field (or 'prompt' and 'response' or 'completion'); "
                        f"found keys {keys}")
    raise SeftError(f"{path}: unsupported file type {path.suffix!r}; valid: .txt, .jsonl")


def _hf_documents(spec: str) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # the hub's errors are many; the message is what matters
        raise SeftError(f"could not load dataset {name!r} from the hub: {str(exc).splitlines()[0][:200]}") from None
    if "text" not in ds.column_names:
        raise SeftError(f"dataset {name!r} has no 'text' column; columns: {ds.column_names}")
    return [t for t in ds["text"] if t and t.strip()]


def check_source(source: str) -> str:
    """Fail fast (before a model loads) on a source that names nothing; returns it unchanged."""
    source = str(source)
    if source in BUILTINS or source.startswith("hf:") or Path(source).expanduser().exists():
        return source
    import difflib

    close = difflib.get_close_matches(source, BUILTINS, n=2, cutoff=0.5)
    raise SeftError(
        f"unknown text source {source!r}: not a built-in, not an existing file; valid: "
        f"{', '.join(BUILTINS)}, a .txt/.jsonl path, or hf:DATASET[:CONFIG]"
        + (f" (did you mean {' or '.join(close)}?)" if close else "")
    )


@functools.lru_cache(maxsize=16)
def _documents_cached(source: str) -> tuple[str, ...]:
    check_source(source)
    if source in BUILTINS:
        return tuple(BUILTINS[source]())
    if source.startswith("hf:"):
        return tuple(_hf_documents(source[3:]))
    return tuple(_local_documents(Path(source).expanduser()))


def load_documents(source: str, split: str = "train") -> list[str]:
    """The documents of `source` in `split` ('train', 'heldout' or 'all')."""
    if split not in SPLITS:
        raise SeftError(f"unknown split {split!r}; {choices_hint(split, SPLITS)}")
    docs = list(dict.fromkeys(_documents_cached(str(source))))  # exact duplicates would leak across splits
    if not docs:
        raise SeftError(f"text source {source!r} holds no documents")
    if split == "all":
        return docs
    if len(docs) < 2:
        raise SeftError(f"text source {source!r} has a single document; a held-out split needs at least 2")
    held = [i for i in range(len(docs)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1] or [len(docs) - 1]
    if split == "heldout":
        return [docs[i] for i in held]
    held_set = set(held)
    return [d for i, d in enumerate(docs) if i not in held_set]


def load_text(source: str, split: str = "train") -> str:
    """The split's documents joined by blank lines — one stream of text."""
    return "\n\n".join(load_documents(source, split))


def token_stream(tokenizer, source: str, split: str = "train") -> torch.Tensor:
    """1-D LongTensor of the split's tokens (documents separated by EOS when known)."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in load_documents(source, split):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def _check_seq_len(seq_len: int, available: int, what: str) -> None:
    if seq_len < 2:
        raise SeftError(f"seq_len must be at least 2, got {seq_len}")
    if available < seq_len:
        raise SeftError(f"{what} has only {available} tokens, fewer than seq_len={seq_len}")


def calibration_windows(tokenizer, source: str, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` random windows of exactly `seq_len` tokens from the train split, seeded."""
    if num_samples < 1:
        raise SeftError(f"num_samples must be at least 1, got {num_samples}")
    stream = token_stream(tokenizer, source, "train")
    _check_seq_len(seq_len, len(stream), f"source {source!r}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def packed_blocks(tokenizer, source: str, seq_len: int, split: str = "train") -> torch.Tensor:
    """Non-overlapping `seq_len` blocks of the split ([n_blocks, seq_len]); the tail is dropped."""
    stream = token_stream(tokenizer, source, split)
    _check_seq_len(seq_len, len(stream), f"source {source!r} ({split})")
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


# --- training datasets -------------------------------------------------------------

class BlockDataset(torch.utils.data.Dataset):
    """Packed causal-LM blocks: every token is a target (labels = input_ids)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}


def is_instruction_source(source: str) -> bool:
    """A .jsonl whose rows carry `prompt` and `response` or `completion` (checked on the first row)."""
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.exists():
        return False
    with path.open(encoding="utf-8") as fh:
        first = next((ln for ln in fh if ln.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "prompt" in row and ("response" in row or "completion" in row)


def encode_instruction(tokenizer, prompt: str, response: str, seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels for one prompt/response pair; the loss sees the response only.

    Uses the tokenizer's chat template when it has one (so the model is trained in
    the format it is prompted in), else `prompt + "\\n" + response + EOS`.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(prompt_ids, dict):  # some tokenizer versions return a BatchEncoding
            prompt_ids = prompt_ids["input_ids"]
        full_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=True, return_dict=False,
        )
        if isinstance(full_ids, dict):
            full_ids = full_ids["input_ids"]
        prompt_ids, full_ids = list(prompt_ids), list(full_ids)
        if full_ids[: len(prompt_ids)] != prompt_ids:  # template renders the turn differently; fall back
            full_ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                full_ids.append(tokenizer.eos_token_id)
    else:
        prompt_ids = tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
        full_ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids.append(tokenizer.eos_token_id)
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids[:seq_len], "labels": labels[:seq_len]}


def encode_completion(tokenizer, prompt: str, completion: str, seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels for a plain prompt + completion; the loss sees the completion only.

    Tokenized the way lm-eval's `loglikelihood` splits a (context, continuation)
    pair -- trailing spaces of the prompt move to the completion, the whole text
    is encoded with the tokenizer's default special tokens, and the first
    len(encode(prompt)) tokens are the context -- so the tokens trained on are
    the tokens a multiple-choice task scores. No chat template and no EOS (lm-eval
    scores neither). Too long: the leftmost tokens are cut, as lm-eval does.
    """
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        prompt, completion = prompt[:-n_spaces], prompt[-n_spaces:] + completion
    full_ids = list(tokenizer(prompt + completion)["input_ids"])
    n_prompt = len(tokenizer(prompt)["input_ids"])
    labels = [-100] * n_prompt + full_ids[n_prompt:]
    return {"input_ids": full_ids[-seq_len:], "labels": labels[-seq_len:]}


class InstructionDataset(torch.utils.data.Dataset):
    """Prompt/response or prompt/completion pairs from a JSONL file, loss on the answer only.

    A row with `response` is an instruction turn (`encode_instruction`: the chat
    template when the tokenizer has one); a row with `completion` is a plain
    continuation (`encode_completion`: exactly what lm-eval scores). Examples with
    no answer token left within seq_len are dropped.
    """

    def __init__(self, tokenizer, source: str, seq_len: int, split: str = "train"):
        rows = _read_jsonl(Path(source).expanduser())
        bad = [i for i, r in enumerate(rows, 1)
               if not isinstance(r, dict) or "prompt" not in r or ("response" in r) == ("completion" in r)]
        if bad:
            raise SeftError(f"{source}: line {bad[0]} needs 'prompt' and exactly one of 'response', 'completion'")
        if split != "all":
            held = {i for i in range(len(rows)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
            rows = [r for i, r in enumerate(rows) if (i in held) == (split == "heldout")]
        encoded = [encode_instruction(tokenizer, str(r["prompt"]), str(r["response"]), seq_len) if "response" in r
                   else encode_completion(tokenizer, str(r["prompt"]), str(r["completion"]), seq_len) for r in rows]
        self.examples = [e for e in encoded if any(t != -100 for t in e["labels"])]
        if not self.examples:
            raise SeftError(f"{source}: no example keeps a response/completion token within seq_len={seq_len}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def pad_collate(pad_id: int):
    """Right-pad a batch; padding is masked out of attention and of the loss."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.as_tensor(b["input_ids"])
            labels[row, :n] = torch.as_tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def training_dataset(tokenizer, source: str, seq_len: int, split: str = "train") -> torch.utils.data.Dataset:
    """Instruction JSONL -> InstructionDataset; any other text source -> packed BlockDataset."""
    if is_instruction_source(source):
        return InstructionDataset(tokenizer, source, seq_len, split)
    return BlockDataset(packed_blocks(tokenizer, source, seq_len, split))
