"""Ready-made pipelines: diffusers pipelines whose __call__ takes a method's arguments."""
