"""The Mooncake transport, speaking the SGLang fork's wire: bootstrap, frames, the Language side's link."""
