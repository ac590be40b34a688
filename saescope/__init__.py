"""saescope's entry points, on top of the library: the command line, the demo and the CLI's live commands.

    cli.py            `saescope ...`: each command parses its stage's config (sae_core/config.py) and calls
                      the stage in sae_core; serving goes to app/serving.py
    options.py        config fields (sae_core/options.py) -> typer options, and the parsed values back
    demo.py           `saescope demo`: the whole pipeline on the bundled model, then serve
    live_commands.py  `saescope activations`, `saescope steer`: the live runtime from the terminal

This package imports `sae_core` and `app`; nothing imports it (tests/test_layering.py keeps it so).
"""
