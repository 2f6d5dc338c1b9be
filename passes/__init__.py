"""torch.fx passes of pomfx: trace a model, convert its conv/linear weights, fold them back."""
