"""What train/ attaches to the model from outside: activation checkpointing must not change the
gradients, and the monitoring probes must report what the mixer computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import LMConfig
from model.lm import TTTLM
from parallel.activation_checkpointing import checkpoint_blocks
from train.monitor import LearningRateProbe, state_norms


def tiny_model(seed: int = 0) -> TTTLM:
    torch.manual_seed(seed)
    return TTTLM(LMConfig(hidden_size=32, num_layers=2, num_attn_heads=2, window_size=8)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def test_checkpointed_blocks_give_the_same_loss_and_gradients() -> None:
    plain, checkpointed = tiny_model(), tiny_model()
    assert checkpoint_blocks(checkpointed) == 2
    inputs, targets = batch()
    plain_loss = plain(inputs, targets).loss
    checkpointed_loss = checkpointed(inputs, targets).loss
    plain_loss.backward()
    checkpointed_loss.backward()
    # float64, same operations recomputed: equal up to summation-order noise far below 1e-12.
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_learning_rate_probe_reports_softplus_of_the_lr_heads() -> None:
    model = tiny_model()
    inputs, _ = batch()
    model(inputs)
    assert not model.blocks[0].mixer.mean_learning_rates.any()  # no probe attached: nothing recorded
    probe = LearningRateProbe(model)
    model(inputs)
    x = model.blocks[0].mixer_norm(model.embed(inputs))
    expected = F.softplus(model.blocks[0].mixer.lr_proj(x)).reshape(2, 32, -1, 3).mean(dim=(0, 1, 2))
    scalars = probe.scalars()
    assert sorted(scalars) == sorted(f"ttt_lr/eta{i}/layer{layer:02d}" for i in range(3) for layer in range(2))
    actual = torch.tensor([scalars[f"ttt_lr/eta{i}/layer00"] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(actual, expected.detach())
    # untrained heads (bias inv_softplus(base_lr), weights normal(0, 0.02) as released) stay near base_lr
    layer1 = torch.tensor([scalars[f"ttt_lr/eta{i}/layer01"] for i in range(3)])
    torch.testing.assert_close(layer1, torch.full((3,), model.cfg.ttt.base_lr), rtol=0.05, atol=0)
    probe.detach()
    model(inputs[:, :5])
    torch.testing.assert_close(probe.scalars(), scalars)  # detached: the buffers keep the last recorded values


def test_learning_rate_probe_in_a_compiled_block_neither_breaks_nor_recompiles_per_layer() -> None:
    """The probe's values come out of the compiled graph (fullgraph, one graph for every layer), equal
    to the eager ones: the trainer compiles its blocks and logs the probe on its logging steps."""
    import torch._dynamo

    from train.compile import compile_blocks

    torch._dynamo.reset()
    eager, compiled = tiny_model(), tiny_model()
    probes = LearningRateProbe(eager), LearningRateProbe(compiled)
    compile_blocks(compiled, fullgraph=True, backend="aot_eager")
    inputs, _ = batch()
    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        eager(inputs)
        compiled(inputs)
    assert probes[1].scalars() == pytest.approx(probes[0].scalars(), rel=1e-12)
    torch._dynamo.reset()


def test_state_norms_name_each_layer_and_fast_weight() -> None:
    model = tiny_model()
    states = model(batch()[0]).states
    norms = state_norms(states, ("w1",))
    assert sorted(norms) == ["ttt_state_norm/w1/layer00", "ttt_state_norm/w1/layer01"]
    assert all(value > 0 for value in norms.values())


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointed_blocks_give_the_same_gradients(policy):
    """Both checkpointing policies recompute exactly what the plain forward computed."""
    torch.manual_seed(0)
    plain = TTTLM(LMConfig(num_layers=2, hidden_size=32, num_attn_heads=2, window_size=8)).double()
    wrapped = TTTLM(LMConfig(num_layers=2, hidden_size=32, num_attn_heads=2, window_size=8)).double()
    wrapped.load_state_dict(plain.state_dict())
    assert checkpoint_blocks(wrapped, selective=policy == "selective") == 2
    ids = torch.randint(0, 256, (2, 19))
    grads = []
    for model in (plain, wrapped):
        model.zero_grad()
        model(ids, ids, return_logits=False).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
