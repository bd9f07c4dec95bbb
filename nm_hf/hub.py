"""Publish sparse models: `prepare_upload` builds the folder, `push_to_hub` sends it in one commit.

The folder holds the weights (normal or compressed), config.json with the `nm_sparsity` record,
the tokenizer, results.json, the plot and history of a run, the TensorBoard `runs/` folder, and a
model card. Training state (optimizer, scheduler, scaler, RNG state, `training_args.bin`,
`trainer_state.json`) is never part of it, and every file taken from a directory must resolve
inside it (a symlink out of the directory, or an index entry naming `../x`, is refused).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ._files import atomic_directory, atomic_write_json
from .card import CardOptions, check_card_options, write_model_card
from .checkpoint.compressed import (
    compressed_file,
    finalized_record,
    write_compressed,
    write_compressed_model,
    write_decompressed,
    write_dense_model,
)
from .checkpoint.directory import (
    CARD_NAME,
    CONFIG_NAME,
    DENSE_INDEX,
    CheckpointError,
    checkpoint_dir,
    copy_extra_files,
    dense_weight_files_and_index,
    file_inside,
    read_config,
    read_json,
    refuse_overlap,
    stale_card,
)
from .injection import unwrap_model
from .record import is_compressed, read_record, record_group_dims

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["prepare_upload", "push_to_hub", "check_repo_id"]

RESULTS_NAME = "results.json"
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is "namespace/name"; ValueError otherwise (checked before any request is sent)."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id {repo_id!r} must be 'namespace/name' (your user or organisation name, a "
                         f"slash, the model name), e.g. 'my-user/{str(repo_id).strip('/') or 'model'}'")
    namespace, name = repo_id.split("/")
    for part in (namespace, name):
        if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part or len(part) > 96:
            raise ValueError(f"repo_id {repo_id!r}: {part!r} is not a valid Hub name (letters, digits, '-', '_', "
                             "'.'; no '--' or '..'; not starting or ending with '-' or '.')")
    return repo_id


def _copy_checkpoint(src: Path, stage: Path, compressed: bool, skip: Iterable[str] = ()) -> None:
    """Copy a checkpoint as it is: weight files, index, config.json and the files that travel with it."""
    weights, weight_map = ([compressed_file(src)], None) if compressed else dense_weight_files_and_index(src)
    for path in weights:
        target = stage / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if weight_map is not None:  # the shards were copied: their index goes with them (not a stale one)
        shutil.copyfile(file_inside(src, DENSE_INDEX, "index"), stage / DENSE_INDEX)
    shutil.copyfile(file_inside(src, CONFIG_NAME, "the model config"), stage / CONFIG_NAME)
    copy_extra_files(src, stage, skip)


def _check_extra_files(extra_files: Iterable[str | os.PathLike]) -> list[Path]:
    paths = [Path(p) for p in extra_files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"extra file {path} does not exist (or is not a file)")
    names = [p.name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(f"extra_files: two files are named {twice[0]!r}; they would land on one name")
    return paths


def prepare_upload(
    model_or_dir: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    compressed: bool = False,
    results: dict | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    model_card: bool = True,
    repo_id: str | None = None,
    overwrite: bool = False,
    **card: Unpack[CardOptions],
) -> Path:
    """Build the folder `push_to_hub` uploads: weights (normal or compressed), tokenizer, results, card.

    From a model: it must be finalized. From a directory: its weights, config, tokenizer files, plot,
    results, history and `runs/` logs are taken (training state and other sub-folders are left out)
    and converted to the requested format. `extra_files` are added by name; a name that is already in
    the folder (config.json, a tokenizer file, ...) is refused. The folder is built in a staging
    directory and renamed at the end: `out_dir` is never left half-written; an existing non-empty
    `out_dir` is refused unless `overwrite`. `card`: the model card's `dataset_name`, `task`, `command`,
    `base_model`, `license` and `training_args` (`nm_hf.card.CardOptions`, see `write_model_card`).
    """
    check_card_options(card, "prepare_upload")
    out = Path(out_dir)
    extras = _check_extra_files(extra_files)
    model = None
    src = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        src = checkpoint_dir(model_or_dir)
        config, record = read_config(src)
        refuse_overlap(src, out, "the upload folder")
    elif isinstance(model_or_dir, nn.Module):
        model = unwrap_model(model_or_dir)  # compiled / DDP wrappers: the model inside
        record, group_dims = finalized_record(model)
    else:
        raise TypeError(f"model_or_dir must be a model or a directory, got {type(model_or_dir).__name__}")

    with atomic_directory(out, overwrite) as stage:
        if src is not None:
            # the source's README.md stays behind when the upload gets a new card or the user's own, and
            # when it is a card nm_hf wrote for the other weights format (its usage and facts would be wrong)
            converted = compressed != is_compressed(record)
            skip = ({CARD_NAME} if model_card or any(p.name == CARD_NAME for p in extras)
                    else stale_card(src) if converted else set())
            if compressed and not is_compressed(record):
                write_compressed(src, stage, config, record, record_group_dims(record, config), skip=skip)
            elif not compressed and is_compressed(record):
                write_decompressed(src, stage, config, record, skip=skip)
            else:
                _copy_checkpoint(src, stage, is_compressed(record), skip)
        elif compressed:
            write_compressed_model(model, stage, record, group_dims)
        else:
            write_dense_model(model, stage, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        reserved = {CARD_NAME} if model_card else set()
        for path in extras:
            if (stage / path.name).exists() or path.name in reserved:
                why = ("the model card (pass model_card=False to upload your own)" if path.name in reserved
                       else "a file of the model")
                raise CheckpointError(f"extra file {path}: {path.name!r} is already in the upload as {why}; "
                                      "rename it or leave it out")
            shutil.copyfile(path, stage / path.name)
        if results:
            merged = read_json(stage / RESULTS_NAME, "results") if (stage / RESULTS_NAME).exists() else {}
            atomic_write_json(stage / RESULTS_NAME, {**merged, **results})
        if model_card:
            write_model_card(stage, model=model, results=results, repo_id=repo_id, source_dir=src,
                             model_name=out.name, **card)
    return out


def push_to_hub(
    model_or_dir: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool = False,
    compressed: bool = False,
    commit_message: str | None = None,
    results: dict | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
    model_card: bool = True,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    **card: Unpack[CardOptions],
) -> Any:
    """Upload a finalized sparse model (or a saved directory) with its tokenizer, card, plot and results.

    `repo_id` must be "namespace/name" (checked before any request). Everything is staged in a
    temporary folder first (`prepare_upload`), then sent in one commit with
    `HfApi(endpoint, token).create_repo(exist_ok=True)` + `upload_folder`. `compressed=True` uploads
    the compressed format (load it with `nm_hf.load_sparse`/`load_compressed`). Returns the
    `huggingface_hub.CommitInfo`. `endpoint` overrides HF_ENDPOINT (e.g. a private Hub). `card`: the
    model card options, as for `prepare_upload`.
    """
    from huggingface_hub import HfApi

    check_card_options(card, "push_to_hub")
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="nm_hf_push_") as tmp:
        stage = prepare_upload(model_or_dir, Path(tmp) / "upload", tokenizer=tokenizer, compressed=compressed,
                               results=results, extra_files=extra_files, model_card=model_card,
                               repo_id=repo_id, **card)
        record = read_record(read_json(stage / CONFIG_NAME, "the model config")) or {}
        message = commit_message or (f"Upload {record.get('n')}:{record.get('m')} sparse model with nm_hf"
                                     + (" (compressed)" if compressed else ""))
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=str(stage), repo_id=repo_id, repo_type="model",
                                 commit_message=message, revision=revision, create_pr=create_pr)
