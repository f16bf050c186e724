"""LoRA adapters on a trained text bridge: small, named, swappable updates of its projector.

A bridge trained on one domain is adapted to another by a low-rank update of its projector's linear
layers (peft's LoRA), trained on the new domain's pairs while every base weight stays frozen and bitwise
as it was. One bridge may carry several adapters, one per domain; `set_adapter(name)` chooses the one
its embeddings go through, and `set_adapter(None)` gives exactly the base's embeddings (peft's layers
then run their base layer alone). `merged()` folds the active adapter into a plain bridge, which loads
without peft.

A saved adapter bridge is a whole bridge directory (the base's `config.json` and `model.safetensors`,
unchanged) plus `adapters/<name>/` per adapter: peft's `adapter_config.json` and
`adapter_model.safetensors` (keys relative to the bridge, `projector.<layer>.lora_A.weight`), and
`dinobridge.json` (the settings, the adapter's fingerprint and the fingerprint of the base it was trained
on, which a load checks) with `temperature.safetensors` (the loss's temperature and bias the adapter was
trained with).

The fingerprint of a bridge with an active adapter covers the base's fingerprint, the adapter's name and
its weights: an image index built through one adapter refuses queries through another, or through none.

torch is imported inside the functions that need it: `dinobridge search` reads which adapter built an
index (`adapter_reason`, `adapter_with_fingerprint`) without it.

Not here: training an adapter (training/align.py trains whatever requires gradients), the CLI (cli.py).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.config import AdapterSettings, ConfigError, from_dict, to_dict
from bridge.model_files import CONFIG_FILE

if TYPE_CHECKING:
    import torch

    from bridge.model import TextBridge

ADAPTERS_DIR = "adapters"  # inside a bridge directory, one folder per adapter
ADAPTER_INFO = "dinobridge.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name
TEMPERATURE_FILE = "temperature.safetensors"
DEFAULT_ADAPTER = "default"  # peft's name for an adapter nobody named
# A key of the torch.nn.ModuleDict peft keeps per adapter (no dots), and a folder name on any system.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name {name!r} is not allowed; use letters, digits, '-' and '_' (up to 64, "
            "starting with a letter or digit), e.g. products"
        )
    return name


def saved_adapters(directory: str | Path) -> list[str]:
    """The names of the adapters saved in a bridge directory, sorted."""
    folder = Path(directory) / ADAPTERS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / ADAPTER_INFO).is_file())


class Adapters:
    """The adapters loaded on one bridge and which is active (None: the base). Not a module: the layers
    it adapts are the bridge's own, so the bridge's parameters and state dict hold them once."""

    def __init__(self, bridge: TextBridge):
        from torch import nn

        self.bridge = bridge
        # Taken before any layer is wrapped: the base's fingerprint, and its weights' (see base_weights).
        self.base_fingerprint = bridge.fingerprint()
        self.base_projector_fingerprint = bridge._fingerprint[1]
        self.parts = nn.ModuleDict({"projector": bridge.projector})
        self.settings: dict[str, AdapterSettings] = {}
        # The loss's (temperature, bias) of the base (key None) and of each adapter.
        self.temperatures: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {None: self._temperature()}
        self.active: str | None = None

    def _temperature(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bridge.logit_scale.detach().clone(), self.bridge.logit_bias.detach().clone()

    def layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in self.parts.modules() if isinstance(module, BaseTunerLayer)]

    def add(self, name: str, settings: AdapterSettings) -> None:
        """A new adapter `name` on the linear layers of `settings.targets`; its update starts at zero
        (LoRA's B is zero), so the bridge's embeddings are still the base's until it trains."""
        from peft import LoraConfig
        from peft.functional import inject_adapter_in_model
        from torch import nn

        check_adapter_name(name)
        if name in self.settings:
            raise ConfigError(f"the bridge already has an adapter named '{name}'; choose another name")
        targets = [
            f"{part}.{module_name}"
            for part in settings.targets
            for module_name, module in self.parts[part].named_modules()
            if isinstance(module, nn.Linear)
        ]
        if not targets:
            raise ConfigError(f"the bridge's {', '.join(settings.targets)} has no linear layer to adapt")
        config = LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets
        )
        inject_adapter_in_model(config, self.parts, adapter_name=name)
        self.settings[name] = copy.deepcopy(settings)
        self.temperatures[name] = self.temperatures[None]
        self.set_active(name)

    def set_active(self, name: str | None) -> None:
        """Route the embeddings through adapter `name`, or None: through the base alone, bit for bit."""
        import torch
        from peft.functional import set_adapter

        if name is not None and name not in self.settings:
            loaded = ", ".join(sorted(self.settings)) or "none"
            raise ConfigError(f"the bridge has no adapter named '{name}' (loaded: {loaded})")
        if self.active is not None:  # the temperature the active adapter has now (it may have trained)
            self.temperatures[self.active] = self._temperature()
        if name is None:
            for layer in self.layers():
                layer.enable_adapters(False)
        else:
            for layer in self.layers():
                layer.enable_adapters(True)
            set_adapter(self.parts, name)
        scale, bias = self.temperatures[name]
        with torch.no_grad():
            self.bridge.logit_scale.copy_(scale)
            self.bridge.logit_bias.copy_(bias)
        self.active = name
        self.bridge._fingerprint = None

    def train_only(self, name: str, temperature: bool) -> None:
        """Make adapter `name` (and, if asked, the temperature and bias) all that requires gradients."""
        from peft.functional import set_requires_grad

        self.set_active(name)
        self.bridge.requires_grad_(False)
        set_requires_grad(self.parts, name, True)
        self.bridge.logit_scale.requires_grad_(temperature)
        self.bridge.logit_bias.requires_grad_(temperature)

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        from peft.functional import get_peft_model_state_dict

        return get_peft_model_state_dict(self.parts, adapter_name=name)

    def fingerprint(self) -> str:
        """The base's fingerprint with no adapter active; else a hash of it, the name and the adapter's
        weights (milliseconds: an adapter is small, so it is hashed again on each call while it trains)."""
        if self.active is None:
            return self.base_fingerprint
        from torch import nn

        from bridge.fingerprint import fingerprint

        weights = self.weights(self.active)
        holder = nn.Module()
        for number, key in enumerate(sorted(weights)):
            holder.register_buffer(f"t{number}", weights[key])
        return fingerprint(holder, self.base_fingerprint, self.active, json.dumps(sorted(weights)))

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The projector's base weights under their plain names, as a bridge without adapters has them."""
        weights = {}
        for key, value in self.bridge.projector.state_dict().items():
            if ".lora_" not in key:
                weights[key.replace(".base_layer.", ".")] = value
        return weights

    def save(self, directory: Path) -> None:
        """Each adapter's folder under directory/adapters/, in peft's format plus dinobridge.json."""
        from safetensors.torch import save_file

        self.temperatures[self.active] = self._temperature()
        for name, settings in self.settings.items():
            folder = directory / ADAPTERS_DIR / name
            folder.mkdir(parents=True, exist_ok=True)
            weights = {k: v.detach().cpu().contiguous() for k, v in self.weights(name).items()}
            save_file(weights, folder / ADAPTER_WEIGHTS)
            self.parts_config(name).save_pretrained(folder)
            scale, bias = self.temperatures[name]
            save_file({"logit_scale": scale.cpu(), "logit_bias": bias.cpu()}, folder / TEMPERATURE_FILE)
            active = self.active
            self.set_active(name)
            info = {
                "settings": to_dict(settings),
                "fingerprint": self.fingerprint(),
                "base_fingerprint": self.base_fingerprint,
                "parameters": sum(v.numel() for v in weights.values()),
            }
            self.set_active(active)
            (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def parts_config(self, name: str):
        """peft's LoraConfig of adapter `name`, as peft saves it."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        settings = self.settings[name]
        targets = sorted(
            key
            for key, module in self.parts.named_modules()
            if isinstance(module, BaseTunerLayer) and name in module.lora_A
        )
        from peft import LoraConfig

        return LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets
        )

    def load(self, directory: Path, name: str) -> None:
        """Adapter `name` from directory/adapters/<name>/, after checking it was trained on this base."""
        from peft.functional import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = directory / ADAPTERS_DIR / check_adapter_name(name)
        if not (folder / ADAPTER_INFO).is_file():
            saved = ", ".join(saved_adapters(directory)) or "none"
            raise ConfigError(
                f"bridge '{directory}' has no adapter '{name}' (it holds: {saved}); choose one of those, "
                "or leave out --adapter for the base bridge"
            )
        info_file = folder / ADAPTER_INFO
        info = json.loads(info_file.read_text())
        if info.get("base_fingerprint") != self.base_fingerprint:
            raise ConfigError(
                f"adapter '{name}' in '{folder}' was trained on another base bridge (fingerprint "
                f"{info.get('base_fingerprint')}, this one's is {self.base_fingerprint}); load it with the "
                "base it was trained on"
            )
        self.add(name, from_dict(AdapterSettings, info["settings"], str(info_file)))
        weights = load_file(folder / ADAPTER_WEIGHTS)
        expected = set(self.weights(name))
        if set(weights) != expected:
            raise ConfigError(
                f"'{folder / ADAPTER_WEIGHTS}' does not hold the weights its settings in {ADAPTER_INFO} "
                f"describe ({len(set(weights) ^ expected)} keys differ); save the adapter again"
            )
        set_peft_model_state_dict(self.parts, weights, adapter_name=name)
        temperature = load_file(folder / TEMPERATURE_FILE)
        self.temperatures[name] = (temperature["logit_scale"], temperature["logit_bias"])
        self.set_active(name)


def attach(bridge: TextBridge) -> Adapters:
    """The bridge's adapters, made on first use."""
    if bridge.adapters is None:
        bridge.adapters = Adapters(bridge)
    return bridge.adapters


def merged(bridge: TextBridge) -> TextBridge:
    """A plain bridge (no adapter, no peft) whose projector is the base's with the active adapter folded
    in: the same embeddings, to float rounding. The bridge itself is left as it is."""
    import torch

    from bridge.model import TextBridge

    if bridge.adapters is None or bridge.adapters.active is None:
        raise ConfigError("no adapter is active to merge; load the bridge with adapter=NAME")
    adapters = bridge.adapters
    projector = copy.deepcopy(bridge.projector)
    # peft's merge: base weight += B @ A * alpha / r, then each wrapped layer gives way to its base layer.
    from peft.tuners.tuners_utils import BaseTunerLayer

    for key, module in list(projector.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapters.active])
            parent, _, child = key.rpartition(".")
            setattr(projector.get_submodule(parent) if parent else projector, child, module.get_base_layer())
    projector.requires_grad_(True)
    encoder = bridge._modules.get("encoder")
    plain = TextBridge(copy.deepcopy(bridge.config), encoder, bridge.tower, projector)
    with torch.no_grad():
        plain.logit_scale.copy_(bridge.logit_scale)
        plain.logit_bias.copy_(bridge.logit_bias)
    return plain


def copy_saved_adapters(base: Path, out: Path, skip: str) -> None:
    """The adapters saved with the base bridge (but `skip`, the one being trained), into `out`, so that
    an adapter trained from an adapter bridge joins the ones it had."""
    for name in saved_adapters(base):
        if name != skip and not (out / ADAPTERS_DIR / name).exists():
            shutil.copytree(base / ADAPTERS_DIR / name, out / ADAPTERS_DIR / name)


def adapter_with_fingerprint(directory: str | Path | None, fingerprint: str) -> str | None:
    """The adapter saved in bridge `directory` whose embeddings have `fingerprint` (what built an index);
    None for the base bridge, or when none of them has it (or there is no such directory)."""
    if directory is None:
        return None
    for name in saved_adapters(directory):
        try:
            info = json.loads((Path(directory) / ADAPTERS_DIR / name / ADAPTER_INFO).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("fingerprint") == fingerprint:
            return name
    return None


def adapter_reason(directory: str | Path | None, fingerprint: str, given: str | None) -> str:
    """Why an index built with `fingerprint` by the bridge in `directory` refuses a bridge whose active
    adapter is `given`, when the two differ in their adapter: said in the refusal; "" otherwise."""
    built_with = adapter_with_fingerprint(directory, fingerprint)
    if built_with is None:
        try:
            base = json.loads((Path(directory) / CONFIG_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError, TypeError, AttributeError):
            return ""
        if base != fingerprint:
            return ""  # made by none of that directory's bridges: nothing to say about adapters
    if built_with == given:
        return ""

    def named(adapter: str | None) -> str:
        return f"adapter '{adapter}'" if adapter else "the base bridge (no adapter)"

    return f" through {named(built_with)}, and this query goes through {named(given)}"
