"""lrem.train's layout: one loop (`loop.py`), one home for pairs and batches (`pairs.py`), no
module leaning on another's private names, and modules small enough to read."""
from __future__ import annotations

import ast
import doctest
from pathlib import Path

import lrem.train

TRAIN = Path(lrem.train.__file__).parent


def test_pairs_doctests():
    import lrem.train.pairs

    result = doctest.testmod(lrem.train.pairs)
    assert result.attempted > 0 and result.failed == 0


def test_no_module_imports_private_names_of_another():
    # `from .sft import _pad` made sft.py a utilities module; shared code gets a public name in its home
    found = [f"{path.name}: from {node.module} import {alias.name}"
             for path in sorted(TRAIN.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and node.module and node.level
             for alias in node.names if alias.name.startswith("_")]
    assert not found, found


def test_modules_stay_under_450_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in TRAIN.glob("*.py")}
    assert max(sizes.values()) <= 450, sizes


def test_accelerate_configs_are_valid_for_accelerate_launch():
    """configs/accelerate/{ddp,fsdp,zero3}.yaml load as Accelerate cluster configs, and every key of
    their fsdp_config / deepspeed_config is an option `accelerate launch` knows (a misspelt key would
    otherwise be ignored silently)."""
    from pathlib import Path

    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    known = {a.dest for a in launch_command_parser()._actions}
    want = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP,
            "zero3.yaml": DistributedType.DEEPSPEED}
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(want)
    for name, kind in want.items():
        cfg = ClusterConfig.from_yaml_file(folder / name)
        assert cfg.distributed_type == kind and cfg.mixed_precision == "bf16" and cfg.num_processes > 1
        raw = yaml.safe_load((folder / name).read_text())
        for section in ("fsdp_config", "deepspeed_config"):
            unknown = set(raw.get(section, {})) - known
            assert not unknown, f"{name}: {section} keys accelerate launch does not know: {unknown}"
    assert yaml.safe_load((folder / "fsdp.yaml").read_text())["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
