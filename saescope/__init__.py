"""saescope's entry points, on top of the library: the command line, the demo and the CLI's live commands.

    cli.py            `saescope ...`: each command parses its stage's config (sae_core/config.py) and calls
                      the stage in sae_core; serving goes to app/serving.py
    options.py        config fields (sae_core/options.py) -> typer options, and the parsed values back
    demo.py           `saescope demo`: the whole pipeline on the bundled model, then serve
    live_commands.py  `saescope activations`, `steer`, `sweep`, `chat`: the live runtime from the terminal
    transcoders.py    `saescope train --transcoders`, `saescope eval-transcoders`
    trace.py          `saescope trace`, `saescope graphs`: attribution graphs (sae_core/circuits)
    bench_sae.py      `saescope bench-sae`: the SAE benchmark suite (sae_core/evaluation)
    accounts.py       `saescope user`, `key`, `usage`: the team atlas's accounts (app/accounts)

This package imports `sae_core` and `app`; nothing imports it (tests/test_layering.py keeps it so).
"""
