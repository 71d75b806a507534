"""lumina/plan.py: a run's precision (timed), regularisation by planned epochs, and compiling; each
choose_* logs its decision and returns it."""
import dataclasses
import math
import re
import time

import pytest
import torch

import Train
from lumina import device, training
from lumina.plan import (PRESETS, TrainConfig, choose_compile, choose_dtype, choose_regularisation, choose_shape,
                         depth_shape, new_model, planned_epochs, regularisation)
from lumina.training import Runtime, forward_backward
from lumina.vocab import Vocab
from conftest import tiny_model


# --- precision by measurement ------------------------------------------------------------------------
def test_dtype_auto_times_both_precisions_and_keeps_the_faster(monkeypatch, tmp_path):
    net = tiny_model(Vocab.from_text("abcdefgh"))
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)  # as on a CPU with AVX512-BF16 or AMX
    real = forward_backward
    for slow, expected in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        monkeypatch.setenv("LUMINA_CACHE_DIR", str(tmp_path / str(slow)))  # the same model: not from the cache
        def timed(model, batch, micro_batch, runtime, scaler, objective):
            time.sleep(0.03 if runtime.dtype == slow else 0.0)
            return real(model, batch, micro_batch, runtime, scaler, objective)
        monkeypatch.setattr(training, "forward_backward", timed)
        config = TrainConfig.from_dict({"batch_size": 2, "seq_length": 16, "dtype": "auto"})
        runtime, logs = Runtime(torch.device("cpu")), []
        name = str(expected)[6:]
        assert choose_dtype(net, config, runtime, logs.append) == expected  # returned: the caller sets and stores it
        assert runtime.dtype == torch.float32 and config.dtype == "auto"  # nothing written behind the caller's back
        assert re.fullmatch(rf"dtype {name} \(asked auto: a training step took [\d.]+ ms in float32, [\d.]+ ms in bfloat16\)",
                            logs[0]) and len(logs) == 1
        assert all(p.grad is None for p in net.parameters())  # the trial steps leave nothing behind


def test_a_forced_dtype_is_obeyed_and_an_emulated_bf16_is_not_tried(monkeypatch):
    net = tiny_model(Vocab.from_text("abcdefgh"))
    monkeypatch.setattr(training, "forward_backward", lambda *a: pytest.fail("a forced or hopeless choice times nothing"))
    for forced in ("float32", "bfloat16", "float16"):
        runtime, logs = Runtime(torch.device("cpu")), []
        chosen = choose_dtype(net, TrainConfig.from_dict({"dtype": forced}), runtime, logs.append)
        assert str(chosen) == f"torch.{forced}" and logs == [f"dtype {forced} (asked {forced})"]
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    runtime, logs = Runtime(torch.device("cpu")), []
    assert choose_dtype(net, TrainConfig.from_dict({"dtype": "auto"}), runtime, logs.append) == torch.float32
    assert "no AVX512-BF16 or AMX" in logs[0]


def test_compile_forced_is_obeyed_and_auto_says_why():
    cpu, gpu = Runtime(torch.device("cpu"), torch.float32), Runtime(torch.device("cuda"), torch.bfloat16)
    for runtime in (cpu, gpu):
        assert choose_compile(TrainConfig.from_dict({"compile": "true"}), runtime, pytest.fail) is True
        assert choose_compile(TrainConfig.from_dict({"compile": "false"}), runtime, pytest.fail) is False
    cases = [(cpu, 60.0, False, "no faster than eager"), (gpu, 15.0, True, "a 15-minute budget leaves time"),
             (gpu, 0.0, True, "no time budget leaves time"), (gpu, 2.0, False, "a 2-minute budget is too short")]
    for runtime, minutes, chosen, why in cases:
        logs = []
        assert choose_compile(TrainConfig.from_dict({"max_minutes": minutes}), runtime, logs.append) is chosen
        assert logs[0].startswith(f"compile auto: {'on' if chosen else 'off'}") and why in logs[0]


# --- regularisation by the epochs a run will see ----------------------------------------------------
def test_the_regularisation_rule_picks_by_budget_data_and_speed():
    gpu = TrainConfig.from_dict({**PRESETS["gpu"], "max_iters": 10 ** 6, "max_minutes": 10.0, "grad_accum": 1})
    per_step = 64 * 512
    epochs, steps = planned_epochs(gpu, 20_000_000, step_seconds=0.03)  # 20,000 steps fit in 10 minutes
    assert round(steps) == 20_000 and math.isclose(epochs, 20_000 * per_step / 20_000_000)  # about 33 epochs
    dropout, decay = regularisation(epochs, 20_000_000 / per_step, 1e-3)
    assert dropout == 0.2 and math.isclose(decay, 2 / (1e-3 * 20_000_000 / per_step))  # forgets over about an epoch
    assert regularisation(8.0, 1000, 1e-3)[0] == 0.1 and regularisation(0.5, 1000, 1e-3)[0] == 0.0
    assert math.isclose(regularisation(40.0, 20, 6e-3)[1], 0.01 / 6e-3)  # tiny data: at most 1% a step
    cpu = TrainConfig.from_dict({**PRESETS["cpu"], "max_minutes": 0.0, "max_iters": 3000})  # no budget: max_iters decides
    epochs, steps = planned_epochs(cpu, 20_000_000, step_seconds=None)
    assert steps == 3000 and math.isclose(epochs, 3000 * 8 * 256 / 20_000_000)


def test_choose_regularisation_returns_its_choice_and_keeps_what_was_set():
    net, runtime = tiny_model(Vocab.from_text("abcdefgh")), Runtime(torch.device("cpu"))
    config = TrainConfig.from_dict({**PRESETS["cpu"], "max_minutes": 0.0, "max_iters": 3000, "seq_length": 16,
                                    "batch_size": 2})
    epochs, _ = planned_epochs(config, 1000, step_seconds=None)  # 96 passes over 1,000 characters
    expected = regularisation(epochs, 1000 / 32, config.learning_rate)
    logs = []
    assert choose_regularisation(net, config, 1000, runtime, logs.append) == expected and expected[0] == 0.2
    assert config.dropout is None and config.weight_decay is None  # returned, not written behind the caller
    assert "96.00 epochs -> dropout 0.2" in logs[0]
    chosen = choose_regularisation(net, dataclasses.replace(config, dropout=0.05), 1000, runtime, logs.append)
    assert chosen == (0.05, expected[1])
    assert choose_regularisation(net, dataclasses.replace(config, dropout=0.0, weight_decay=0.3), 1000, runtime,
                                 pytest.fail) == (0.0, 0.3)


def test_a_runs_levers_go_into_its_model_and_its_file(tmp_path):
    from lumina.checkpoint import build_model, load_checkpoint, model_state, save_checkpoint
    from conftest import TINY
    vocab = Vocab.from_text("abcdefgh")
    net = new_model(TrainConfig(**TINY, ngram_buckets=0, qk_norm=True, logit_softcap=15.0), vocab).eval()
    assert net.config.qk_norm is True and net.config.logit_softcap == 15.0
    save_checkpoint(str(tmp_path / "Model.pth"), {"vocab": vocab.chars, "model": model_state(net), "config": {},
                                                   "model_config": dataclasses.asdict(net.config), "metrics": {}})
    loaded, _ = build_model(load_checkpoint(str(tmp_path / "Model.pth")))
    x = torch.randint(len(vocab), (1, 10))
    with torch.no_grad():
        assert loaded.config == net.config and torch.equal(loaded.eval()(x)[0], net(x)[0])


def test_train_pys_config_dict_is_the_typed_configs_keys_and_defaults():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(Train.CONFIG) == fields - {"end_weight"}  # end_weight is fine_tune.py's key
    assert TrainConfig.from_dict(Train.CONFIG) == TrainConfig()  # the dict a user edits starts where the class does
    assert set(TrainConfig.types()) == {k for k, v in Train.CONFIG.items() if v is None}


def test_the_typed_config_checks_each_value_once_and_fills_a_preset():
    from lumina.config import ConfigError
    with pytest.raises(ConfigError, match="dropout must be between 0.0 and 0.9, got 2"):
        TrainConfig.from_dict({"dropout": 2})
    config = TrainConfig.from_dict({"dropout": 0, "compile": True, "hidden_size": 64, "not_a_key": 1})
    assert config.dropout == 0.0 and type(config.dropout) is float and config.compile == "true"
    cpu = config.with_preset("cpu")
    assert cpu.hidden_size == 64 and cpu.num_layers == PRESETS["cpu"]["num_layers"]  # a key set wins over the preset
    assert config.with_preset("cuda").batch_size == PRESETS["gpu"]["batch_size"]
    assert TrainConfig.from_dict(cpu.as_dict()) == cpu  # what a checkpoint stores reads back the same


# --- the shape, chosen for the budget ----------------------------------------------------------------
def seconds_per_block_param(k):
    """A fake machine: a step's seconds grow with the model's block parameters (about 12 x width^2
    per layer), k seconds per parameter."""
    return lambda config: k * 12 * config.num_layers * config.hidden_size ** 2


def shape_for(minutes, k=2e-7, train_chars=10 ** 9, max_iters=10 ** 9, device_type="cpu"):
    config = TrainConfig.from_dict({"max_minutes": minutes, "max_iters": max_iters})
    logs = []
    keys, line = choose_shape(config, 90, train_chars, device_type, logs.append, seconds_per_block_param(k))
    assert logs == [line] and config.hidden_size is None  # logged once, returned, not written into config
    return keys, line


def test_the_shape_rule_picks_a_bigger_model_for_a_bigger_budget_and_a_smaller_one_on_a_slower_machine():
    depth = {(minutes, k): shape_for(minutes, k)[0]["num_layers"] for minutes in (5, 60, 240) for k in (2e-7, 8e-7)}
    assert depth[5, 2e-7] < depth[60, 2e-7] < depth[240, 2e-7]  # the same machine, more time
    assert depth[240, 8e-7] < depth[240, 2e-7] and depth[60, 8e-7] < depth[60, 2e-7]  # 4x slower, same time
    keys, line = shape_for(240)
    assert keys == {**depth_shape(keys["num_layers"]), "seq_length": keys["seq_length"], "batch_size": keys["batch_size"]}
    small = shape_for(5)[0]
    assert keys["seq_length"] > small["seq_length"]  # a longer budget buys a longer context too
    assert keys["batch_size"] * keys["seq_length"] == pytest.approx(small["batch_size"] * small["seq_length"], rel=0.25)
    for said in (f"depth {keys['num_layers']}", f"width {keys['hidden_size']}", f"context {keys['seq_length']}",
                 "characters per block parameter", "240 min"):
        assert said in line, said


def test_the_shape_rule_counts_repeated_data_and_plans_steps_without_a_budget():
    assert shape_for(240, train_chars=200_000)[0]["num_layers"] < shape_for(240)[0]["num_layers"]  # tiny data
    keys = {iters: choose_shape(TrainConfig.from_dict({"max_minutes": 0.0, "max_iters": iters}), 90, 10 ** 9, "cpu",
                                lambda line: None, pytest.fail)[0]["num_layers"] for iters in (2_000, 200_000)}
    assert keys[2_000] < keys[200_000]  # no budget: max_iters alone says how much the run reads, nothing is timed


def test_block_parameters_are_counted_as_the_model_holds_them():
    from lumina.model import ModelConfig
    for depth in (3, 4, 7):
        shape = ModelConfig(vocab_size=90, **depth_shape(depth), ngram_buckets=64)
        net = new_model(TrainConfig(**depth_shape(depth), seq_length=32, dropout=0.0, ngram_buckets=64), range(90))
        assert shape.block_params() == sum(p.numel() for p in net.blocks.parameters())


def test_a_shape_set_by_the_user_is_kept():
    config = TrainConfig.from_dict({"hidden_size": 64})
    assert choose_shape(config, 90, 10 ** 9, "cpu", pytest.fail, pytest.fail) == ({}, None)


def test_train_logs_and_stores_the_chosen_shape_and_a_resumed_run_keeps_it(tmp_path, capsys):
    from lumina.checkpoint import load_checkpoint
    from conftest import CHATS, write_jsonl
    chat_file = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS * 30])
    common = [f"--data={chat_file}", f"--out_dir={tmp_path}", "--eval_interval=3", "--probe_chars=0", "--threads=1"]
    Train.main([*common, "--max_iters=3", "--max_minutes=0.5"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("shape auto:"))
    state = load_checkpoint(str(tmp_path / "train_state.pth"))
    chosen = {k: state["config"][k] for k in ("hidden_size", "num_layers", "nhead", "seq_length", "batch_size")}
    assert chosen["num_layers"] == 3 and state["shape"] == line  # a few hundred characters of chats: the smallest
    assert f"width {chosen['hidden_size']}" in line and load_checkpoint(str(tmp_path / "Model.pth"))["shape"] == line
    Train.main([*common, "--max_iters=6", "--max_minutes=600", "--resume"])  # a far bigger budget now
    assert "shape auto:" not in capsys.readouterr().out
    resumed = load_checkpoint(str(tmp_path / "train_state.pth"))
    assert resumed["step"] == 6 and resumed["shape"] == line
    assert {k: resumed["config"][k] for k in chosen} == chosen
