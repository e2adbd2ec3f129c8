"""The converted-model cache is filled atomically, and never swapped under a process reading it; the KV
cache is found under its old and new keyword (transformers < 5.24: `past_key_values`, from 5.24: `cache`)."""

from __future__ import annotations

from types import SimpleNamespace

from trimformer.loading import _move_into_place
from trimformer.patch.cache_names import CACHE_KWARG, cache_from, cache_kwargs, drop_cache_kwargs, output_cache


def _copy(folder, marker: str, complete: bool = True):
    folder.mkdir()
    (folder / "weights").write_text(marker)
    if complete:
        (folder / "config.json").write_text("{}")
    return folder


def test_conversion_moves_into_an_empty_place(tmp_path):
    tmp, target = _copy(tmp_path / "tmp", "new"), tmp_path / "model"
    _move_into_place(tmp, target)
    assert (target / "weights").read_text() == "new" and not tmp.exists()


def test_a_complete_copy_converted_meanwhile_is_kept(tmp_path):
    target = _copy(tmp_path / "model", "other process")
    tmp = _copy(tmp_path / "tmp", "new")
    _move_into_place(tmp, target)
    assert (target / "weights").read_text() == "other process"
    assert tmp.exists()  # left for the caller's clean-up


def test_a_copy_without_config_is_replaced(tmp_path):
    target = _copy(tmp_path / "model", "broken", complete=False)
    tmp = _copy(tmp_path / "tmp", "new")
    _move_into_place(tmp, target)
    assert (target / "weights").read_text() == "new" and (target / "config.json").exists()


def test_the_kv_cache_is_found_under_either_keyword():
    cache = object()
    assert cache_from({"past_key_values": cache}) is cache
    assert cache_from({"cache": cache, "past_key_values": None}) is cache
    assert cache_from({"hidden_states": 1}) is None
    assert cache_kwargs(cache) == {CACHE_KWARG: cache}
    assert output_cache(SimpleNamespace(past_key_values=cache)) is cache
    assert output_cache(SimpleNamespace(cache=cache)) is cache
    assert output_cache(SimpleNamespace(logits=1)) is None
    kwargs = {"cache": cache, "past_key_values": cache, "position_ids": 3}
    drop_cache_kwargs(kwargs)
    assert kwargs == {"position_ids": 3}
