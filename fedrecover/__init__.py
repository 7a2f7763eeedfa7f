"""llmprune.fedrecover: federated LoRA recovery of pruned models on Flower (see docs/recover.md).

`recover(model_dir, data, RecoverConfig(...), out)` runs the Flower ServerApp/ClientApp pair in
simulation; the same apps (`llmprune.fedrecover.server_app:app`, `...client_app:app`) run on a real
fleet with flower-superlink / flower-supernode / flwr run."""

from .aggregation import ClientUpdate, aggregate, client_view, flexlora, fedavg, hetlora, lowrank_svd, pad_rank
from .aggregations import Aggregation, get_aggregation, register
from .config import AGGREGATIONS, TARGET_MODULES, RecoverConfig, RunSettings, parse_run_config
from .fleet import Assignment, Device, assign_devices, load_fleet, training_memory_mb
from .lora import attach_lora, detach_lora, get_lora_arrays, lora_applied, merge_lora, module_shapes, set_lora_arrays
from .partition import ClientData, build_client_data, partition_indices
from .pipeline import METRICS_FILE, RecoverResult, recover, state_dir_for
from .policy import AssignmentPolicy, FleetPlan, FleetPolicy, SubmodelPolicy, plan_fleet
from .submodels import Submodel
from .task import chunked_lm_loss, train_lora
from .client_model import chunked_vocab_loss, load_submodel
from .adaptive import BanditPolicy, StagePolicy
from .bandit import Arm, DeviceBandit, arm_grid, round_rewards
from .devft import Stage, expand_lora, fuse_model, load_stage_model
from .prune_tune import PruneStep, prune_step

__all__ = [
    "AGGREGATIONS", "METRICS_FILE", "TARGET_MODULES", "Aggregation", "Assignment", "AssignmentPolicy", "ClientData",
    "ClientUpdate", "Device", "FleetPlan", "FleetPolicy", "RecoverConfig", "RecoverResult", "RunSettings", "aggregate",
    "assign_devices", "attach_lora", "build_client_data", "get_aggregation", "parse_run_config", "plan_fleet",
    "register",
    "chunked_lm_loss", "client_view", "detach_lora", "fedavg", "flexlora", "get_lora_arrays", "hetlora",
    "load_fleet", "lora_applied", "lowrank_svd", "merge_lora", "module_shapes", "pad_rank", "partition_indices",
    "recover", "set_lora_arrays", "state_dir_for", "train_lora", "training_memory_mb", "Submodel", "SubmodelPolicy",
    "load_submodel", "chunked_vocab_loss", "Arm", "BanditPolicy", "DeviceBandit", "PruneStep", "Stage", "StagePolicy",
    "arm_grid", "expand_lora", "fuse_model", "load_stage_model", "prune_step", "round_rewards",
]
