"""The CPU demo: a tiny pixel-space HDM trained on generated coloured shapes (``python -m demo.run``)."""
