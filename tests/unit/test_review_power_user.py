"""A power user's journeys past the README's basics: own checkpoints, partial evaluation, comparisons."""

from __future__ import annotations

import pytest

from dmea_dist.cli import main


def _checkpoint(folder, *, weights: bool = True, tokenizer: bool = True, extra_rows: int = 0):
    """A 1-layer GPT-2 and its byte-level tokenizer, saved with save_pretrained (what a user brings offline)."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=128, vocab_size=len(vocab) + extra_rows,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    if weights:
        GPT2LMHeadModel(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    if tokenizer:
        GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("missing", ["weights", "tokenizer", "rows"])
def test_a_local_checkpoint_missing_a_part_is_one_error_line(tmp_path, capsys, missing):
    """model.pretrained pointing to a folder without its weights ended, on Ray, in the coordinator actor's
    OSError traceback after Ray had started; without its tokenizer files transformers 5 built an empty
    tokenizer and the run died in grow_vocabulary ('vocab_size 130 is smaller than the checkpoint's 400');
    a tokenizer smaller than the embeddings likewise. Each is now refused before anything starts."""
    folder = _checkpoint(tmp_path / "ckpt", weights=missing != "weights", tokenizer=missing != "tokenizer",
                         extra_rows=500 if missing == "rows" else 0)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  tasks: [synth.travel.00]\n  synth_sizes: [8, 4, 4]\nmodel:\n  pretrained: {folder}\n"
                      f"  max_length: 128\ntracking:\n  enabled: false\noutput_dir: {tmp_path / 'runs'}\n")
    assert main(["run", str(config), "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and str(folder) in err and "Traceback" not in err, err
    assert {"weights": "no weights", "tokenizer": "no vocabulary", "rows": "embedding rows"}[missing] in err, err
    assert not list((tmp_path / "runs").glob("*-*")), "no run directory for a run that never started"
