"""CKKS encryption shared by sites and the aggregator.

Modules are split by who may import them: `presets`, `layout`, `wire`, `seal_bytes` and
`aggregator_key` hold no secret and are safe for `strategies/`; `keys`, `codec` and `messages`
load or use the secret key and are imported only by `sites/` (and the `fedhealth keys` command).
"""
