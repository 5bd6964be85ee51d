import torch

from conftest import CONFIGS
from vlmtune.backbone import load_backbone
from vlmtune.config import load_config
from vlmtune.stages import apply_stage, build_plan, check_groups, count_parameters
from vlmtune.tasks.retrieval import RetrievalTask


def _model_and_plan():
    cfg = load_config(CONFIGS / "retrieval_two_stage.yaml", ["stages.1.vision_blocks=1"])
    task = RetrievalTask.from_config(cfg)
    model = task.build_model(load_backbone(cfg.backbone))
    return cfg, model, build_plan(cfg, task.loss_weights())


def test_groups_cover_every_trainable_parameter_once() -> None:
    cfg, model, plan = _model_and_plan()
    for stage in plan:
        groups = apply_stage(model, stage, 1e-3, 0.01)
        check_groups(model, groups)
        names = {g["name"].split("/")[0] for g in groups}
        assert names == set(stage.train)
        for g in groups:
            comp = g["name"].split("/")[0]
            assert g["lr"] == 1e-3 * stage.train[comp]


def test_trainable_count_per_stage() -> None:
    cfg, model, plan = _model_and_plan()
    apply_stage(model, plan[0], 1e-3, 0.0)
    t0, total = count_parameters(model)
    heads = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("backbone."))
    assert t0 == heads
    apply_stage(model, plan[1], 1e-3, 0.0)
    t1, _ = count_parameters(model)
    block = sum(p.numel() for p in model.backbone.vision_blocks[-1].parameters())
    norm = sum(p.numel() for p in model.backbone.vision_tower.layernorm.parameters())
    assert t1 == heads + block + norm
    assert total == sum(p.numel() for p in model.parameters())


def test_gradients_reach_unfrozen_blocks_and_only_them(scenes) -> None:
    """Stage 2 trains the last vision block: after a few steps it has changed, the
    earlier block and the language model have not (no no_grad anywhere on the path)."""
    cfg, model, plan = _model_and_plan()
    stage = plan[1]
    groups = apply_stage(model, stage, 1e-2, 0.0)
    opt = torch.optim.AdamW(groups)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    from vlmtune.data.formats import read_pairs

    cfg.train.batch_size = 8
    loader = RetrievalTask.from_config(cfg).make_loader(read_pairs(scenes / "train.json"), model.backbone, train=True)
    model.train()
    for _, batch in zip(range(3), loader):
        terms = model(batch, stage.losses)
        sum(terms[k] for k in stage.losses).backward()
        opt.step()
        opt.zero_grad()
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last = len(model.backbone.vision_blocks) - 1
    assert any(f"encoder.layer.{last}." in k for k in changed)
    assert not any("encoder.layer.0." in k for k in changed)
    assert not any("language_model" in k or "embeddings" in k for k in changed)


def test_gradient_checkpointing_recomputes_trained_blocks_with_equal_gradients(scenes) -> None:
    """With backbone.gradient_checkpointing the trained vision block runs twice per step
    (forward, then recomputed in backward) and the gradients are the same."""
    from vlmtune.data.formats import read_pairs

    cfg, model, plan = _model_and_plan()
    stage = plan[1]
    cfg.train.batch_size = 8
    batch = next(iter(RetrievalTask.from_config(cfg).make_loader(read_pairs(scenes / "train.json"), model.backbone, train=True)))
    model.heads_dropout = 0.0
    grads = []
    for checkpointing in (False, True):
        apply_stage(model, stage, 1e-3, 0.0)
        model.backbone.set_gradient_checkpointing(set(stage.train) if checkpointing else set())
        model.train()
        for m in model.modules():  # same network both times: no dropout in the heads
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        calls = []
        # transformers checkpoints a layer's forward, so the hooks of its sub-modules run again.
        hook = model.backbone.vision_blocks[-1].mlp.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        torch.manual_seed(0)
        terms = model(batch, frozenset({"contrastive", "box"}))
        (terms["contrastive"] + terms["box"]).backward()
        hook.remove()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "encoder.layer.1" in n})
        model.zero_grad()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    # The frozen parts of the backbone stay in eval mode.
    assert model.backbone.vision_tower.is_activation_checkpointing
    assert not model.backbone.language_model.training
