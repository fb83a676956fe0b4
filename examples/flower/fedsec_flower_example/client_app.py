"""The institution's ClientApp: a plain Flower train function, and fedsec's mod in front of it.

Swapping Flower's SecAgg+ for fedsec is the ``mods=[...]`` line: ``secaggplus_mod`` becomes
``FedsecMod(...)``. The train function is ordinary Flower code: it receives the global arrays
and a config, trains, and returns the trained arrays with ``num-examples``. The mod sees them,
not the server: it sends only the masked, encoded update inside fedsec's secure sum.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsec_flower_example.task import ADAPTER, ExampleSettings, node_credentials, workload
from fl_core.flower.mod import ClientCredentials, FedsecMod
from fl_core.strategies import ClientOptions

#: Where a node keeps its position in its own data between rounds (data order continues across
#: rounds, as in ``fedsec simulate``); Flower may run each round in another worker process.
_DATA_STATE = "example.data"


def make_client_app(settings: ExampleSettings | None = None) -> ClientApp:
    """The ClientApp; ``settings`` None: read them from the run config of each message."""

    def resolve(context: Context) -> ExampleSettings:
        return settings or ExampleSettings.from_run_config(context.run_config)

    def creds(context: Context) -> ClientCredentials:
        return node_credentials(context, resolve(context))

    app = ClientApp(mods=[FedsecMod(creds)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        s = resolve(context)
        _, trainer = workload(s)
        name = sorted(trainer.work.train_sets)[creds(context).client_id - 1]
        global_vector = msg.content.array_records["arrays"][ADAPTER].numpy()
        config = msg.content.config_records["config"]
        lr = config.get("lr")
        mu = config.get("proximal-mu", 0.0)
        options = ClientOptions(
            lr=float(lr) if isinstance(lr, int | float) else None,
            prox_mu=float(mu) if isinstance(mu, int | float) else 0.0,
        )
        index = int(config["server-round"]) - 1  # type: ignore[arg-type]
        state = context.state.config_records.get(_DATA_STATE, ConfigRecord({"batches": 0}))
        trainer.batches_drawn[name] = int(state["batches"])  # type: ignore[arg-type]
        update = trainer.train(name, index, global_vector, options)
        context.state.config_records[_DATA_STATE] = ConfigRecord(
            {"batches": trainer.batches_drawn[name]}
        )
        trained = trainer.work.lm.get_vector()  # global + update, exactly as trained
        content = RecordDict(
            {
                "arrays": ArrayRecord({ADAPTER: Array(trained)}),
                "metrics": MetricRecord(
                    {"num-examples": update.num_samples, "train-loss": update.train_loss}
                ),
            }
        )
        return Message(content, reply_to=msg)

    return app


app = make_client_app()
