"""llmprune.fedrecover: federated LoRA recovery of pruned models on Flower (see docs/recover.md).

`recover(model_dir, data, RecoverConfig(...), out)` runs the Flower ServerApp/ClientApp pair in
simulation; the same apps (`llmprune.fedrecover.server_app:app`, `...client_app:app`) run on a real
fleet with flower-superlink / flower-supernode / flwr run. Who trains what each round is a policy
(`fedrecover.policies`: plan, submodels, bandit, devft, prune-tune), chosen by name."""

from .aggregation import ClientUpdate, aggregate, client_view, fedavg, flexlora, hetlora, lowrank_svd, pad_rank
from .aggregations import Aggregation, get_aggregation, register
from .bandit import Arm, DeviceBandit, arm_grid, round_rewards
from .client_model import chunked_vocab_loss, load_submodel
from .config import (
    AGGREGATIONS,
    TARGET_MODULES,
    DataConfig,
    FleetConfig,
    PrivacyConfig,
    RecoverConfig,
    RunSettings,
    TrainingConfig,
    parse_run_config,
)
from .devft import Stage, expand_lora, fuse_model, load_stage_model
from .device_models import DeviceModel, register_device_model
from .fleet import Assignment, Device, assign_devices, load_fleet, training_memory_mb
from .lora import attach_lora, detach_lora, get_lora_arrays, lora_applied, merge_lora, module_shapes, set_lora_arrays
from .partition import ClientData, Partition, build_client_data, partition_indices
from .pipeline import METRICS_FILE, RecoverResult, recover, state_dir_for
from .planning import FleetPlan, plan_fleet
from .policies import POLICIES, Policy, PolicyConfig, RoundOutcome, get_policy
from .policies import register as register_policy
from .policies.bandit import BanditConfig, BanditPolicy
from .policies.devft import DevftConfig, StagePolicy
from .policies.plan import PlanConfig, PlanPolicy
from .policies.prune_tune import PruneTuneConfig, PruneTunePolicy
from .policies.submodels import SubmodelConfig, SubmodelPolicy, draw_submodel
from .prune_tune import PruneStep, prune_step
from .submodels import Submodel
from .task import chunked_lm_loss, train_lora

__all__ = [
    "AGGREGATIONS", "METRICS_FILE", "POLICIES", "TARGET_MODULES", "Aggregation", "Arm", "Assignment", "BanditConfig",
    "BanditPolicy", "ClientData", "ClientUpdate", "DataConfig", "Device", "DeviceBandit", "DeviceModel", "DevftConfig",
    "FleetConfig", "FleetPlan", "Partition", "PlanConfig", "PlanPolicy", "Policy", "PolicyConfig", "PrivacyConfig",
    "PruneStep", "PruneTuneConfig", "PruneTunePolicy", "RecoverConfig", "RecoverResult", "RoundOutcome", "RunSettings",
    "Stage", "StagePolicy", "Submodel", "SubmodelConfig", "SubmodelPolicy", "TrainingConfig", "aggregate", "arm_grid",
    "assign_devices", "attach_lora", "build_client_data", "chunked_lm_loss", "chunked_vocab_loss", "client_view",
    "detach_lora", "draw_submodel", "expand_lora", "fedavg", "flexlora", "fuse_model", "get_aggregation",
    "get_lora_arrays", "get_policy", "hetlora", "load_fleet", "load_stage_model", "load_submodel", "lora_applied",
    "lowrank_svd", "merge_lora", "module_shapes", "pad_rank", "parse_run_config", "partition_indices", "plan_fleet",
    "prune_step", "recover", "register", "register_device_model", "register_policy", "round_rewards",
    "set_lora_arrays", "state_dir_for", "train_lora", "training_memory_mb",
]
