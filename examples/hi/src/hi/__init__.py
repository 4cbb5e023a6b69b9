"""`hi`: the reference shoal app (the Elixir article's `hi`, in Python).

One process is one node: a Starlette app served by uvicorn in-process, with a
`shoal.Node` configured by the contract's environment variables.
"""
