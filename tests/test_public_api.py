"""The names users and scripts import stay importable, and light imports stay light."""

import subprocess
import sys


def test_entry_points_are_the_documented_objects():
    import rlora
    from rlora import AdapterConfig, InferenceEngine, TrainConfig, attach, head_similarity, load, save, train
    from rlora.tiny import build_tiny_model

    import rlora.adapter.inject  # a submodule import must not shadow the function of the same role
    import rlora.training.loop

    assert callable(attach) and rlora.attach is attach and rlora.adapter.attach is attach
    assert callable(train) and rlora.train is train
    assert all(callable(f) for f in (save, load, head_similarity, build_tiny_model))
    assert isinstance(AdapterConfig, type) and isinstance(TrainConfig, type) and isinstance(InferenceEngine, type)


def test_checking_a_config_or_a_key_imports_no_torch():
    # `rlora tenant create` and the upload check must not pay for torch and transformers.
    code = (
        "import sys, service.api.auth, rlora.data.records, rlora.training.config, rlora.adapter.config; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
