"""Distillation: DAgger data with teacher labels, divergences, the DIGR penalty, the loss and the trainer."""
