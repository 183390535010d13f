"""Corpora -> token streams -> calibration and evaluation windows.

Corpus specs (``resolve_corpus``):

=================  ==========================================================================
``sotu``           = ``sotu:calib``: State of the Union addresses given before 2001 (1790-2000)
``sotu:calib``     the same
``sotu:heldout``   addresses from 2001 onwards (2001-2021). The split is fixed by the year in the
                   file name, so it never moves when the package adds addresses at the end.
``sotu:all``       every address
``sotu:val``       addresses 1991-2000: validation text of the calibration domain, for choosing
                   calibration settings without looking at held-out text
``sotu:train``     addresses before 1991 (``sotu:calib`` without ``sotu:val``): calibration data
                   for runs that are then scored on ``sotu:val``
``brown``          = ``brown:heldout`` (the multi-genre evaluation set)
``brown:heldout``  per genre (file letter ``a``..``r``), the last 20% of that genre's files by name
                   (rounded up): 105 of the 500 files, every one of the 15 genres. Stratified so both
                   splits cover every genre (a plain "last 20% by name" would be all fiction).
``brown:calib``    the other 395 files
``brown:all``      all 500 files
``file:PATH``      a ``.txt`` file, or a directory whose ``*.txt`` files (sorted, recursive) are
``PATH``           the documents; a plain path works when it exists
``hf:NAME[:CONFIG[:SPLIT]]``  a Hugging Face ``datasets`` dataset (needs ``datasets`` and the
                   internet); the ``text`` column, empty rows dropped. SPLIT defaults to ``test``.
``A+B[+...]``      the documents of every part, in that order (e.g. ``sotu:calib+brown:calib``,
                   calibration text from both domains; windows are drawn in proportion to size)
=================  ==========================================================================

Documents are tokenized and joined with the tokenizer's EOS between them (no BOS), giving one
stream ``[T]``. Calibration takes random non-overlapping windows of it, evaluation its tail.
A model whose tokenizer starts every text with BOS (Gemma: without it the model is lost, SOTU
perplexity 37 instead of 16) gets windows of ``seq_len - 1`` stream tokens behind a BOS, as its
own tokenizer would feed it; a tokenizer that adds no BOS (SmolLM2) gets plain stream windows.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch

from gq_quantize.assets import AssetError, asset_path

SOTU_HELDOUT_FROM_YEAR = 2001
SOTU_VAL_FROM_YEAR = 1991  # sotu:val = [1991, 2001): the last decade of the calibration years
BROWN_HELDOUT_FRACTION = 0.2

VALID_SPECS = (
    "sotu", "sotu:calib", "sotu:heldout", "sotu:all", "sotu:val", "sotu:train",
    "brown", "brown:heldout", "brown:calib", "brown:all",
    "file:PATH", "PATH (existing .txt file or directory)", "hf:NAME[:CONFIG[:SPLIT]]", "A+B (several of these)",
)

_SOTU_FILE = re.compile(r"^(\d{4})_")
_BROWN_FILE = re.compile(r"^c([a-r])\d\d\.txt$")


# --------------------------------------------------------------------------------------------
# specs -> documents


def _asset_dir(name: str, cache: Path) -> Path:
    """The prepared asset directory, or an AssetError telling the user to run `gq prepare`."""
    d = asset_path(name, cache)
    if not d.is_dir() or not any(d.glob("*.txt")):
        raise AssetError(
            f"corpus {name!r} is not prepared (no {d}); run `gq prepare` "
            f"(quantize.assets.prepare_assets(what=[{name!r}])) or set GQ_CACHE to a prepared cache"
        )
    return d


def sotu_split(names: list[str], split: str) -> list[str]:
    """Select SOTU file names ``YEAR_*.txt`` for ``split`` in {calib, heldout, all, val, train}; sorted."""
    def year(n: str) -> int:
        m = _SOTU_FILE.match(n)
        if not m:
            raise ValueError(f"not a SOTU file name (YEAR_name_party.txt): {n!r}")
        return int(m.group(1))

    keep = {
        "calib": lambda y: y < SOTU_HELDOUT_FROM_YEAR,
        "heldout": lambda y: y >= SOTU_HELDOUT_FROM_YEAR,
        "all": lambda y: True,
        "val": lambda y: SOTU_VAL_FROM_YEAR <= y < SOTU_HELDOUT_FROM_YEAR,
        "train": lambda y: y < SOTU_VAL_FROM_YEAR,
    }[split]
    return sorted(n for n in names if keep(year(n)))


def brown_split(names: list[str], split: str) -> list[str]:
    """Select Brown file names ``cXNN.txt`` for ``split`` in {calib, heldout, all}; sorted.

    Held out: within each genre letter X, the last ``ceil(20%)`` files by name.
    """
    by_genre: dict[str, list[str]] = {}
    for n in sorted(names):
        m = _BROWN_FILE.match(n)
        if not m:
            raise ValueError(f"not a Brown file name (cXNN.txt): {n!r}")
        by_genre.setdefault(m.group(1), []).append(n)
    heldout = set()
    for files in by_genre.values():
        k = max(1, math.ceil(BROWN_HELDOUT_FRACTION * len(files)))
        heldout.update(files[-k:])
    keep = {"calib": lambda n: n not in heldout, "heldout": lambda n: n in heldout, "all": lambda n: True}[split]
    return sorted(n for n in names if keep(n))


def _read_txt_docs(paths: list[Path]) -> list[str]:
    """Read UTF-8 text files, dropping empty ones."""
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    return [d for d in docs if d.strip()]


def _local_docs(path: Path) -> list[str]:
    """Documents of a ``.txt`` file (one document) or a directory of ``.txt`` files."""
    if path.is_file():
        return _read_txt_docs([path])
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"corpus directory {path} has no .txt files")
        return _read_txt_docs(files)
    raise FileNotFoundError(f"corpus path {path} does not exist")


def _hf_docs(rest: str) -> list[str]:
    """``NAME[:CONFIG[:SPLIT]]`` -> the non-empty ``text`` rows of a Hugging Face dataset."""
    parts = rest.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"bad hf spec 'hf:{rest}'; expected hf:NAME[:CONFIG[:SPLIT]]")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 else "test")
    try:
        import datasets  # lazy: optional dependency, and slow to import
    except ImportError as e:
        raise ImportError(
            f"corpus 'hf:{rest}' needs the `datasets` package: pip install datasets "
            "(or use an offline corpus: sotu, brown, or a path to .txt files)"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, auth, missing config: all surface as various types
        raise RuntimeError(
            f"could not load Hugging Face dataset {name!r} (config={config}, split={split}): {e}. "
            "It needs internet access to the Hugging Face Hub (or a local datasets cache); "
            "offline, use sotu, brown, or a path to .txt files."
        ) from e
    column = "text" if "text" in ds.column_names else None
    if column is None:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds[column] if t and t.strip()]


def resolve_corpus(spec: str, cache: Path | None = None) -> list[str]:
    """Corpus spec -> list of documents (str). See the module docstring for the specs.

    Raises ValueError for an unknown spec (listing valid ones), AssetError when a built-in
    corpus has not been prepared (run `gq prepare`).
    """
    from gq_serve.util import cache_root

    cache = Path(cache) if cache is not None else cache_root()
    if "+" in spec and not Path(spec).expanduser().exists():
        parts = spec.split("+")
        if not all(parts):
            raise ValueError(f"corpus spec {spec!r} has an empty part; join specs as A+B (e.g. sotu:calib+brown:calib)")
        return [doc for part in parts for doc in resolve_corpus(part, cache)]
    head, _, tail = spec.partition(":")
    if (head == "sotu" and tail in ("", "calib", "heldout", "all", "val", "train")) or (
            head == "brown" and tail in ("", "calib", "heldout", "all")):
        split = tail or ("calib" if head == "sotu" else "heldout")
        d = _asset_dir(head, cache)
        names = [p.name for p in d.glob("*.txt")]
        chosen = (sotu_split if head == "sotu" else brown_split)(names, split)
        return _read_txt_docs([d / n for n in chosen])
    if head == "file" and tail:
        return _local_docs(Path(tail).expanduser())
    if head == "hf" and tail:
        return _hf_docs(tail)
    if Path(spec).expanduser().exists():
        return _local_docs(Path(spec).expanduser())
    raise ValueError(f"unknown corpus spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}")


# --------------------------------------------------------------------------------------------
# documents -> tokens -> windows


def tokenize_corpus(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents -> one token stream, LongTensor ``[T]``: doc0 EOS doc1 EOS ... docN (no BOS).

    The EOS between documents tells the model a new document starts, as in pretraining.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token before tokenizing")
    if not docs:
        raise ValueError("no documents to tokenize (empty corpus)")
    ids: list[int] = []
    # verbose=False: whole documents exceed model_max_length on purpose (they are windowed later)
    batch = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    for i, doc_ids in enumerate(batch):
        if i:
            ids.append(eos)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def corpus_tokens(tokenizer, spec: str, cache: Path | None = None) -> torch.Tensor:
    """``tokenize_corpus(tokenizer, resolve_corpus(spec, cache))``: LongTensor ``[T]``."""
    return tokenize_corpus(tokenizer, resolve_corpus(spec, cache))


def bos_prefix(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of every text it encodes, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _with_prefix(windows: torch.Tensor, prefix: int | None) -> torch.Tensor:
    if prefix is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), prefix, dtype=windows.dtype), windows], dim=1)


def sample_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` random non-overlapping windows of ``seq_len`` from ``tokens [T]`` -> ``[n, seq_len]``.

    Non-overlap without rejection sampling: the ``n * seq_len`` window tokens leave
    ``slack = T - n*seq_len`` spare tokens; a seeded random composition of the slack into
    ``n + 1`` gaps places the windows, in stream order. Deterministic for a given seed.
    """
    if n <= 0 or seq_len <= 0:
        raise ValueError(f"n and seq_len must be positive (got n={n}, seq_len={seq_len})")
    total = int(tokens.numel())
    need = n * seq_len
    if total < need:
        raise ValueError(
            f"corpus has {total} tokens, fewer than n*seq_len = {n}*{seq_len} = {need}; "
            "use fewer or shorter windows, or a larger corpus (e.g. sotu:all, brown:all)"
        )
    slack = total - need
    g = torch.Generator().manual_seed(int(seed))
    # n+1 gaps summing to `slack`: sorted uniform cut points in [0, slack] (stars and bars).
    cuts = torch.sort(torch.randint(0, slack + 1, (n,), generator=g)).values
    starts = cuts + torch.arange(n) * seq_len
    # Shuffle the window order so a batch is not one document's consecutive pieces.
    starts = starts[torch.randperm(n, generator=g)]
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return tokens[idx].clone()


def tail_windows(tokens: torch.Tensor, ctx: int, max_tokens: int) -> torch.Tensor:
    """The last ``max_tokens`` tokens (rounded down to a multiple of ``ctx``) -> ``[W, ctx]``."""
    if ctx <= 0 or max_tokens < ctx:
        raise ValueError(f"need ctx > 0 and max_tokens >= ctx (got ctx={ctx}, max_tokens={max_tokens})")
    total = int(tokens.numel())
    if total < ctx:
        raise ValueError(f"corpus has {total} tokens, fewer than one window of ctx={ctx}")
    use = (min(max_tokens, total) // ctx) * ctx
    return tokens[total - use:].reshape(-1, ctx).clone()


def calibration_windows(tokenizer, spec: str, n: int, seq_len: int, seed: int,
                        cache: Path | None = None) -> torch.Tensor:
    """``n`` random non-overlapping calibration windows of corpus ``spec``: LongTensor ``[n, seq_len]``
    (behind a BOS when the tokenizer adds one, see :func:`bos_prefix`)."""
    bos = bos_prefix(tokenizer)
    body = seq_len - (bos is not None)
    return _with_prefix(sample_windows(corpus_tokens(tokenizer, spec, cache), n, body, seed), bos)


def eval_windows(tokenizer, spec: str, ctx: int, max_tokens: int,
                 cache: Path | None = None) -> torch.Tensor:
    """Evaluation windows: the tail of corpus ``spec`` as LongTensor ``[W, ctx]``, W = max_tokens // ctx
    (with a BOS tokenizer: ``ctx - 1`` stream tokens behind a BOS per window, the last ``W * (ctx - 1)``)."""
    bos = bos_prefix(tokenizer)
    if bos is None:
        return tail_windows(corpus_tokens(tokenizer, spec, cache), ctx, max_tokens)
    w = max_tokens // ctx
    return _with_prefix(tail_windows(corpus_tokens(tokenizer, spec, cache), ctx - 1, w * (ctx - 1)), bos)


def data_hash(tokens: torch.Tensor, length: int = 16) -> str:
    """Short hex sha256 of token ids (shape included) for cache manifests; dtype-independent."""
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:length]


__all__ = [
    "resolve_corpus", "tokenize_corpus", "corpus_tokens", "sample_windows", "tail_windows",
    "calibration_windows", "eval_windows", "data_hash", "sotu_split", "brown_split", "VALID_SPECS", "bos_prefix",
]
