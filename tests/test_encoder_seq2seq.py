"""The encoder of an encoder-decoder model (Marian): exact when nothing is dropped; dropping shortens the
encoder output and the cross-attention mask with it; generate works; untrim restores; clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import MarianConfig, MarianMTModel

from trimformer import ConfigError, UnsupportedModelError, stats, trim, untrim

torch.set_num_threads(1)


def marian(seed: int = 0) -> MarianMTModel:
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=64, d_model=32, encoder_layers=4, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                          forced_eos_token_id=None)
    return MarianMTModel(config).eval()


def source() -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows ending in </s> (id 1): 14 and 9 tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 64, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[:, 13] = 1
    ids[1, 8], ids[1, 9:], mask[1, 9:] = 1, 0, 0
    return ids, mask


DECODER_IDS = torch.tensor([[0, 5, 7], [0, 9, 3]])


@pytest.mark.parametrize("method", ["cls_attention", "random"])
def test_nothing_dropped_gives_the_models_own_outputs(method):
    model = marian()
    ids, mask = source()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=DECODER_IDS)
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        trim(model, method=method, keep=1.0, layers=[0, 2])
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=DECODER_IDS)
        again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        s = stats(model)
        untrim(model)
    assert float((out.logits - ref.logits).abs().max()) < 1e-4
    valid = mask.bool()
    assert float((out.encoder_last_hidden_state[valid] - ref.encoder_last_hidden_state[valid]).abs().max()) < 1e-4
    assert torch.equal(greedy, again)
    assert s["kept_fraction"] == 1.0 and s["encoder_output_tokens"] == [14, 9]


def test_dropping_shortens_the_encoder_and_the_cross_attention_mask_follows():
    model = marian()
    ids, mask = source()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=DECODER_IDS).logits
        trim(model, method="cls_attention", keep=0.5, layers=[0, 2])
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=DECODER_IDS)
        s = stats(model)
        reduced_mask = model._trimformer_patch.source_mask.clone()
        untrim(model)
        enc = out.encoder_last_hidden_state                                   # (B, T', D) kept tokens only
        # the decoder by hand on the reduced encoder output: with the reduced mask it gives the trimmed
        # model's logits; with a mask of ones (filler of the short row attended) it does not
        by_hand = model.lm_head(model.model.decoder(input_ids=DECODER_IDS, encoder_hidden_states=enc,
                                                    encoder_attention_mask=reduced_mask).last_hidden_state)
        unmasked = model.lm_head(model.model.decoder(input_ids=DECODER_IDS, encoder_hidden_states=enc,
                                                     encoder_attention_mask=torch.ones_like(reduced_mask))
                                 .last_hidden_state)
    # 14 -> 7 -> 4 tokens and 9 -> 5 -> 3: the encoder output is as wide as the longest row keeps
    assert s["kept_tokens_per_layer"] == [23, 12, 12, 7] and s["encoder_output_tokens"] == [4, 3]
    assert enc.shape[1] == 4 and reduced_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert s["kept_fraction"] == pytest.approx(54 / 92)
    assert float((by_hand - out.logits).abs().max()) < 1e-5
    assert float((unmasked[1] - out.logits[1]).abs().max()) > 1e-4
    assert float((full - out.logits).abs().max()) > 1e-4


def test_generate_works_after_pruning_greedy_and_beams():
    model = marian()
    ids, mask = source()
    trim(model, method="cls_attention", keep=0.5, layers=[1])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, num_beams=3)
        widths = stats(model)["encoder_output_tokens"]
        # greedy decoding = step-by-step argmax of the trimmed forward
        step = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(greedy.shape[1] - 1):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=step).logits[:, -1]
            step = torch.cat([step, logits.argmax(-1, keepdim=True)], dim=1)
    untrim(model)
    assert widths == [7, 5]
    assert greedy.shape == (2, 7) and beams.shape[0] == 2
    assert torch.equal(step, greedy)


def test_untrim_restores_and_unsupported_methods_are_refused():
    model = marian()
    ids, mask = source()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=DECODER_IDS).logits
        trim(model, method="random", keep=0.5, layers=[0])
        untrim(model)
        after = model(input_ids=ids, attention_mask=mask, decoder_input_ids=DECODER_IDS).logits
    assert torch.equal(ref, after)
    assert not any(layer.__dict__.get("forward") for layer in model.model.encoder.layers)
    assert not model.model.encoder._forward_hooks and not model.model.decoder._forward_pre_hooks
    for method in ("tome", "lazy"):
        with pytest.raises(UnsupportedModelError):
            trim(model, method=method, keep=0.5, layers=[0])
    with pytest.raises(ConfigError, match="cross-attends to every encoder output"):
        trim(model, method="random", keep=0.5, layers=[0], cls_only_last=True)
    assert not hasattr(model, "_trimformer_patch")
