"""Optional glue for one framework each, imported only on use
(``from gradchain.integrations.lightning import ChainedOptimization``)."""
