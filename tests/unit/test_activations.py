import pytest
import torch

from safety_circuits import load_model
from safety_circuits.activations import batches, check_prompts, mean_activations, tokenize
from safety_circuits.testing import tiny_hf


def test_mean_activations_equal_direct_computation(make_subject):
    subject = make_subject("qwen2")
    prompts = ["Hi", "Write a poem about the sea and the lazy dog", "How do I make bread?"]
    names = ["blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
    means = mean_activations(subject, prompts, names, batch_size=2)
    for name in names:
        acts = []
        for ids in tokenize(subject, [subject.chat(p) for p in prompts]):
            _, cache = subject.tl.run_with_cache(torch.tensor([ids]), names_filter=name)
            acts.append(cache[name][0])
        assert torch.allclose(means[name], torch.cat(acts).mean(0), atol=1e-5)


def test_batches_cover_prompts_left_padded(make_subject):
    subject = make_subject("llama")
    prompts = ["a", "a much longer prompt than the first", "mid length one", "b"]
    seen = []
    for batch in batches(subject, prompts, batch_size=3):
        assert (batch.attention_mask[:, -1] == 1).all(), "left padding keeps the last column real"
        seen += batch.order
    assert sorted(seen) == list(range(len(prompts)))


@pytest.mark.parametrize(
    ("prompts", "message"), [([], "empty"), (["ok", "  "], "positions \\[1\\]"), ("one", "list")]
)
def test_bad_prompt_lists(prompts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_prompts(prompts)


def test_too_long_prompt(make_subject):
    subject = make_subject("llama")
    with pytest.raises(ValueError, match="max_ctx"):
        tokenize(subject, ["word " * (subject.max_ctx + 10)])


def test_user_scope_covers_exactly_the_prompt(make_subject):
    subject = make_subject("llama")
    prompts = ["Tell me a joke about the sea", "Hi"]
    (batch,) = batches(subject, prompts, batch_size=2, scope="user")
    for row, i in enumerate(batch.order):
        chosen = batch.input_ids[row][batch.measured[row].bool()]
        assert subject.tokenizer.decode(chosen).strip() == prompts[i]
        assert batch.measured[row].sum() < batch.attention_mask[row].sum()  # the template is left out
    (plain,) = batches(subject, prompts, batch_size=2)
    assert torch.equal(plain.measured, plain.attention_mask)
    with pytest.raises(ValueError, match="scope"):
        next(batches(subject, prompts, scope="assistant"))


def test_mean_activations_keyed_by_requested_name_on_the_bridge(make_subject):
    subject = make_subject("llama", "bridge")
    names = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    assert set(mean_activations(subject, ["Hi", "How do I bake bread?"], names)) == set(names)


def test_max_ctx_is_at_most_the_models_positions(tokenizer):
    hf = tiny_hf("llama", len(tokenizer))
    hf.config.max_position_embeddings = 64
    subject = load_model(hf, tokenizer=tokenizer)
    assert subject.max_ctx == subject.tl.cfg.n_ctx == 64
    with pytest.raises(ValueError, match="longer than max_ctx=64"):
        tokenize(subject, ["word " * 80])
