"""Visualisations: ViT merged regions PNG, kept/pruned text HTML and PNG (encoder and decoder)."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

from trimformer import TrimformerError, trim, untrim
from trimformer_lab.visualize import merged_regions_png, patch_groups, text_html, text_png, token_depths

torch.set_num_threads(1)


def test_vit_merged_regions_png(tmp_path):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=4)).eval()
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0, :, :16] = 1.0                   # two flat halves: merges stay within a half
    trim(model, method="tome", r=10, trace_source=True)
    with torch.no_grad():
        model(pixel_values=x)
    groups = patch_groups(model)
    assert groups[0] == 0 and int((groups == 0).sum()) == 1            # [CLS] alone
    assert len(set(groups[1:].tolist())) == 65 - 30 - 1                 # 30 merges in 3 layers of r=10
    path = merged_regions_png(model, x, tmp_path / "regions.png")
    img = Image.open(path)
    assert img.size == ((32 + 4 + 32) * 7, 32 * 7)   # enlarged to about 224 px
    first = patch_groups(model, layer=0)
    assert len(set(first[1:].tolist())) == 64 - 10
    with pytest.raises(TrimformerError, match="trace_source"):
        trim(model, method="tome", r=4)
        model(pixel_values=x)
        patch_groups(model, layer=0)


def test_encoder_text_html_marks_pruned_and_merged(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    ids = torch.randint(1, 50, (1, 12))
    trim(model, method="cls_attention", keep=0.5, layers=[1], trace_source=True)
    with torch.no_grad():
        model(input_ids=ids)
    kept = model._trimformer_patch.state.kept[0]
    page = text_html(model, None, ids, path=tmp_path / "text.html")
    assert (tmp_path / "text.html").exists()
    flags = [f == "1" for f in re.findall(r'data-kept="(\d)"', page)]
    assert flags == kept.tolist() and sum(flags) == 6
    assert 'title="token 0: kept' in page                                # [CLS] kept
    text_png(model, None, ids, tmp_path / "text.png")
    assert Image.open(tmp_path / "text.png").size[0] > 100
    trim(model, method="tome", r=2)
    with torch.no_grad():
        model(input_ids=ids)
    page = text_html(model, None, ids)
    assert "merged into slot" in page and page.count('data-kept="1"') == 12


def test_decoder_text_html_reads_kept_positions_from_the_cache(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(1, 64, (1, 40))
    trim(model, method="random", keep=0.5, layers=[1], sinks=2, protect_last=4)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    info = token_depths(model, ids, out)
    slots = out.past_key_values._trimformer_state.slots[3]
    kept_positions = set(slots.positions[0][slots.valid[0]].tolist())
    assert {i for i, d in enumerate(info["depth"].tolist()) if d == 4} == kept_positions
    assert set(info["depth"].tolist()) == {2, 4}                       # dropped after layer 1, or kept
    page = text_html(model, None, ids, output=out, path=tmp_path / "dec.html")
    assert page.count('data-kept="1"') == len(kept_positions) == 20
    assert 'pruned after layer 1' in page
    text_png(model, None, ids, tmp_path / "dec.png", output=out)
    assert (tmp_path / "dec.png").exists()
    untrim(model)
    with pytest.raises(TrimformerError, match="not trimmed"):
        token_depths(model, ids, out)
