"""AKD, adapter-based knowledge distillation: teacher soft labels -> LoRA adapters of the device model."""

from cloud.akd.student import AdapterConfig, adapter_state, build_student, export_adapter, lora_config
from cloud.akd.teacher import LabelRow, TeacherLabels, teacher_labels
from cloud.akd.trainer import AKDConfig, AKDError, AKDReport, AKDTrainer

__all__ = [
    "AKDConfig",
    "AKDError",
    "AKDReport",
    "AKDTrainer",
    "AdapterConfig",
    "LabelRow",
    "TeacherLabels",
    "adapter_state",
    "build_student",
    "export_adapter",
    "lora_config",
    "teacher_labels",
]
