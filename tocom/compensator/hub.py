"""Sharing plugins through the Hugging Face hub (or any local folder laid out like a hub repo)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tocom.compensator.bank import CompensatorBank
from tocom.compensator.io import T, load_plugin, save_plugin

PLUGIN_SUFFIX = ".tocom.safetensors"
DEFAULT_FILENAME = "compensator" + PLUGIN_SUFFIX


def _find_in_dir(folder: Path, filename: str | None) -> Path:
    if filename is not None:
        return folder / filename
    found = sorted(folder.glob("*" + PLUGIN_SUFFIX))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder} holds {len(found)} files named *{PLUGIN_SUFFIX}; pass filename= to choose one"
        )
    return found[0]


def from_pretrained(repo_or_dir: str, filename: str | None = None, cls: type[T] = CompensatorBank,
                    **hub_kwargs) -> T:
    """Load a plugin from a local folder or a hub repo (``hf_hub_download``, so caches and
    ``HF_HUB_OFFLINE=1`` work as usual)."""
    folder = Path(repo_or_dir)
    if folder.is_dir():
        return load_plugin(_find_in_dir(folder, filename), cls)
    from huggingface_hub import hf_hub_download

    return load_plugin(hf_hub_download(repo_or_dir, filename or DEFAULT_FILENAME, **hub_kwargs), cls)


def model_card(plugin: CompensatorBank) -> str:
    """A README for the repo: what the plugin is for, its shape and its training recipe."""
    s = plugin.spec
    recipe = "\n".join(f"| {k} | {v} |" for k, v in sorted(s.recipe.items())) or "| (not recorded) | |"
    return f"""---
library_name: tocom
tags: [token-compression, token-merging, vision-transformer, tocom]
---
# Token Compensator for `{s.arch}`

A ToCom plugin: {s.groups} low-rank groups (rank {s.rank}) on W_q and W_v of each of the
{s.depth} blocks, trained by self-distillation so that a model fine-tuned at one
{s.method.upper()} degree runs well at another (0..{s.max_degree}), with zero inference overhead.

```python
import timm, tocom
plugin = tocom.Compensator.from_pretrained("<this repo>")
tocom.attach(model, plugin, source=0)   # degree the model was fine-tuned at
tocom.set_degree(model, 16)             # fold delta(0 -> 16) into the weights
```

| field | value |
| --- | --- |
| architecture | {s.arch} |
| embed dim / depth / heads | {s.embed_dim} / {s.depth} / {s.num_heads} |
| groups / rank / scale | {s.groups} / {s.rank} / {s.scale} |
| method / variant / mode | {s.method} / {s.variant} / {s.mode} |
| model family | {s.family} |

## Training recipe

| key | value |
| --- | --- |
{recipe}
"""


def push_to_hub(plugin: CompensatorBank, repo_id: str, filename: str = DEFAULT_FILENAME,
                private: bool = False,
                **hub_kwargs) -> str:
    """Upload the plugin file and a model card; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(**hub_kwargs)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_plugin(plugin, Path(tmp) / filename)
        (Path(tmp) / "README.md").write_text(model_card(plugin))
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="Upload tocom compensator")
    return str(info)
