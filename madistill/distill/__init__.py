"""Distillation: DAgger data with teacher labels, the DIGR penalty, the loss and the trainer (the divergences are in
madistill.common)."""
