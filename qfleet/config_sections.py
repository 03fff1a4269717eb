"""The config's sections: one dataclass each, every field with its allowed range and help
text in ``field(metadata=...)`` (what validation and ``qfleet config --explain`` read).
``Config`` and its validation live in qfleet.config."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, *, lo: float | None = None, hi: float | None = None,
       gt: float | None = None, choices: tuple[Any, ...] | None = None,
       help: str = "") -> Any:
    meta = {"lo": lo, "hi": hi, "gt": gt, "choices": choices, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# A field only Python can set (a callable): never in TOML, never validated or compared, but
# carried wherever the config goes (pickled to spawned workers with it).
PYTHON_ONLY = "python_only"


@dataclass
class EnvConfig:
    id: str = _f("CartPole-v1", help="a Gymnasium id; 'module:EnvId' (import module, then "
                 "gym.make(EnvId)); or 'module:Class' / 'module:function' returning the env")
    kwargs: dict[str, Any] = _f(  # noqa: RUF009 (a default_factory, as for every list)
        {}, help="keyword arguments for gym.make or the class, e.g. "
        "{map_name = \"8x8\", is_slippery = false}")
    wrappers: list[str] = _f(  # noqa: RUF009
        [], help="'module:function' list, applied in order to every env (actors and eval): "
        "each takes the env and returns a wrapped env")
    num_envs: int = _f(1, lo=1, help="environments per actor, stepped as one vector env")
    max_episode_steps: int = _f(0, lo=0, help="0 keeps the env's own limit")
    frame_stack: int = _f(4, lo=1, help="frames stacked for Atari ids")
    # The Atari protocol (qfleet.atari): training-only settings; eval plays whole games.
    vector: str = _f("auto", choices=("auto", "ale", "gymnasium"),
                     help="Atari ids: 'auto'/'ale' = ale-py's AtariVectorEnv (C++ threads), "
                     "'gymnasium' = Gymnasium's Atari wrappers on a SyncVectorEnv")
    terminal_on_life_loss: bool | None = _f(None, help="ALE ids, training: a lost life "
                                            "ends the episode, not the game (unset: on)")
    clip_reward: bool | None = _f(None, help="ALE ids, training: rewards clipped to their "
                                  "sign; metrics and eval report the game's score (unset: on)")
    noop_max: int = _f(30, lo=0, help="Atari ids: up to this many no-op frames at a start")
    fire_reset: bool = _f(True, help="Atari ids: press FIRE at a start where the game has it")
    # qfleet.train(cfg, env_fn=...): builds the env instead of id (and kwargs).
    fn: Callable[[], Any] | None = field(default=None, repr=False, compare=False,
                                         metadata={PYTHON_ONLY: True})


@dataclass
class AlgoConfig:
    name: str = _f("dqn", choices=("dqn", "apex", "gorila", "a3c", "a2c"),
                   help="the scheme: a row of the table in README.md")
    gamma: float = _f(0.99, lo=0.0, hi=1.0, help="discount factor")
    n_step: int = _f(1, lo=1, hi=100, help="steps in each return (DQN: n-step targets; "
                     "a2c/a3c: the rollout length)")
    double: bool = _f(True, help="double DQN: the online net picks the target's action")
    # Gradient schemes (gorila, a3c, a2c): workers send gradients to a global model.
    aggregation: str = _f("auto", choices=("auto", "sync", "async", "grouped"),
                          help="auto = sync for gorila and a2c, async for a3c")
    group_size: int = _f(0, lo=0, help="grouped: workers averaged synchronously per group; "
                         "groups update the global model asynchronously")
    max_staleness: int = _f(8, lo=0, help="async/grouped: gradients computed on parameters "
                            "more than this many global updates old are dropped or scaled")
    stale: str = _f("drop", choices=("drop", "scale"),
                    help="scale = weight (max_staleness + 1) / (staleness + 1)")
    on_worker_loss: str = _f("proceed", choices=("proceed", "wait"),
                             help="sync: average the live workers, or wait for the restart")
    sync_every: int = _f(1, lo=1, help="gradients a worker sends between parameter pulls")
    a3c_mode: str = _f("hogwild", choices=("hogwild", "queue"),
                       help="hogwild = workers apply gradients to the shared model lock-free; "
                       "queue = workers push rollouts, trainers compute the gradients")
    trainers: int = _f(1, lo=1, help="a3c queue mode: trainer threads popping rollouts")
    value_coef: float = _f(0.5, lo=0.0, help="a2c/a3c: weight of the value loss")
    entropy_coef: float = _f(0.01, lo=0.0, help="a2c/a3c: weight of the entropy bonus")


@dataclass
class NetConfig:
    torso: str = _f("auto", choices=("auto", "mlp", "cnn", "minatar"),
                    help="auto = mlp for flat observations, cnn (Nature) for (C, H, W) frames "
                    "of 36x36 or more, minatar (one 3x3 conv) for smaller ones")
    hidden: list[int] = _f(  # noqa: RUF009 (_f gives lists a default_factory)
        [256, 256], help="MLP layer widths (cnn: the last is the fully connected layer's)")
    dueling: bool = _f(False, help="dueling head: Q = V + A - mean(A)")
    activation: str = _f("relu", choices=("relu", "tanh"), help="MLP hidden activation")
    shared_torso: bool = _f(True, help="actor-critic: policy and value heads share one "
                            "torso; false = two separate MLPs (as SB3's A2C builds them)")
    init: str = _f("default", choices=("default", "orthogonal"),
                   help="actor-critic: orthogonal = gain sqrt(2) hidden, 0.01 policy head, "
                   "1 value head (the A2C/PPO convention)")


@dataclass
class ReplayConfig:
    kind: str = _f("auto", choices=("auto", "uniform", "prioritized"),
                   help="auto = prioritized where the scheme samples by priority (apex, "
                   "gorila with scope sharded), else uniform")
    capacity: int = _f(100_000, lo=1, help="transitions kept (all shards together)")
    alpha: float = _f(0.6, lo=0.0, help="prioritization exponent: p = (|td| + eps) ** alpha")
    beta0: float = _f(0.4, lo=0.0, hi=1.0, help="initial IS exponent, annealed to 1")
    beta_steps: int = _f(0, lo=0, help="transitions added over which beta reaches 1; "
                         "0 = the run's train.total_env_steps")
    eps: float = _f(1e-6, gt=0.0, help="added to |td| so no priority is zero")
    shards: int = _f(1, lo=1, help="prioritized shards sampled by total priority")
    storage: str = _f("auto", choices=("auto", "ring", "frames"),
                      help="frames = each image frame stored once; auto = frames for "
                      "uint8 frame stacks")
    scope: str = _f("local", choices=("local", "shared", "sharded"),
                    help="gorila: each worker its own replay, one replay for all, or one "
                    "prioritized shard per worker sampled by every worker")



@dataclass
class LearnerConfig:
    lr: float = _f(1e-3, gt=0.0, help="learning rate of the optimizer")
    lr_schedule: str = _f("constant", choices=("constant", "linear", "cosine"),
                          help="the learning rate over the run's env steps: constant, or "
                          "from lr to lr_final at train.total_env_steps, on a line or a "
                          "half cosine")
    lr_final: float = _f(0.0, lo=0.0, help="the learning rate at train.total_env_steps "
                         "when lr_schedule is linear or cosine")
    batch_size: int = _f(64, lo=1, help="transitions per gradient step")
    learning_starts: int = _f(1000, lo=0, help="env steps collected before the first update")
    train_every: int = _f(256, lo=1, help="env steps between training rounds")
    updates_per_round: int = _f(128, lo=1, help="gradient steps per training round")
    target_update_every: int = _f(128, lo=1, help="updates between hard target copies")
    tau: float = _f(1.0, gt=0.0, hi=1.0, help="1.0 = hard copy, <1 = Polyak every update")
    huber: bool = _f(True, help="Huber (smooth L1) TD loss; false = squared error")
    max_grad_norm: float = _f(10.0, lo=0.0, help="0 disables clipping")
    adam_eps: float = _f(1e-8, gt=0.0, help="eps of the optimizer (Adam or RMSprop)")
    optimizer: str = _f("adam", choices=("adam", "rmsprop"),
                        help="rmsprop: alpha 0.99, as A2C/A3C use it")
    max_replay_ratio: float = _f(0.0, lo=0.0, help="cap on sampled / inserted transitions; "
                                 "0 = only the train_every/updates_per_round schedule")
    prefetch: int = _f(1, lo=1, help="prioritized replay: batches drawn at once, their "
                       "priorities written back after all of them (Ape-X prefetching)")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"),
                     help="where the learner trains; auto = cuda when torch sees a GPU")
    background_sample: str = _f("auto", choices=("auto", "on", "off"),
                                help="prioritized replay: draw the next batches (and copy "
                                "them to the device) in a thread while the current ones "
                                "train, so their priorities go back one group later; "
                                "auto = on when the learner trains on cuda")


@dataclass
class ActorsConfig:
    count: int = _f(1, lo=1, help="actors (or gradient workers), each with its own envs")
    eps_start: float = _f(1.0, lo=0.0, hi=1.0, help="initial exploration rate (dqn, gorila)")
    eps_end: float = _f(0.04, lo=0.0, hi=1.0, help="final exploration rate (dqn, gorila)")
    eps_fraction: float = _f(0.16, gt=0.0, hi=1.0, help="share of total steps to anneal over")
    eps_schedule: str = _f("linear", choices=("constant", "linear", "cosine"),
                           help="the exploration rate from eps_start to eps_end over "
                           "eps_fraction of the steps, on a line or a half cosine (constant: "
                           "eps_start throughout)")
    chunk_size: int = _f(64, lo=1, help="vector steps an actor takes per chunk")
    sync_every: int = _f(0, lo=0, help="env steps between an actor's parameter pulls; "
                         "0 = before every chunk")
    apex_eps: float = _f(0.4, lo=0.0, hi=1.0, help="Ape-X: actor i explores with "
                         "apex_eps ** (1 + apex_alpha * i / (N - 1))")
    apex_alpha: float = _f(7.0, lo=0.0, help="Ape-X: the spread of the actors' epsilons")


@dataclass
class RuntimeConfig:
    backend: str = _f("inline", choices=("inline", "processes", "ray"),
                      help="where roles run: this process, worker processes, or Ray")
    address: str = _f("local", help="ray: 'local' starts Ray in this process; 'auto' or "
                      "'ray://host:port' joins a running cluster")
    torch_threads: int = _f(1, lo=0, help="0 keeps torch's default")
    start_method: str = _f("auto", choices=("auto", "fork", "forkserver", "spawn"),
                           help="processes: how worker processes start; auto = fork on "
                           "Linux, spawn elsewhere")
    replay_on: str = _f("learner", choices=("learner", "learner_node", "actors"),
                        help="ray, dqn/apex: 'learner' keeps the replay in the learner's "
                        "process; 'actors' puts one shard actor beside each actor; "
                        "'learner_node' puts the shard actors on the learner's node")
    sample_requests: int = _f(4, lo=1, help="ray, replay_on != 'learner': batches the "
                              "learner keeps requested ahead from the shard actors")
    learner_host: str = _f("driver", choices=("driver", "actor"),
                           help="ray: 'driver' trains in the qfleet process; 'actor' in a Ray "
                           "actor that asks for a GPU when learner.device is cuda (or auto "
                           "and the cluster has one)")
    stall_timeout_s: float = _f(120.0, lo=0, help="seconds with no env step and no update, "
                                "or with nothing from one worker, before the run stops with "
                                "an error naming what stalled and where it is stuck; 0 = "
                                "never")


@dataclass
class TrainConfig:
    total_env_steps: int = _f(50_000, lo=1, help="env steps over all actors; the run's "
                              "length")
    eval_every: int = _f(5_000, lo=0, help="env steps between greedy evals; 0 = only at the end")
    eval_episodes: int = _f(20, lo=1, help="greedy episodes per evaluation")
    eval_epsilon: float = _f(0.0, lo=0.0, hi=1.0, help="chance of a random action in every "
                             "evaluation (Nature DQN's Atari protocol: 0.05, so an agent "
                             "that never presses FIRE does not stall a game); 0 = greedy")
    target_return: float | None = _f(None, help="stop once a greedy eval reaches it")
    max_wall_s: float = _f(0.0, lo=0, help="seconds of training (a resumed run counts its "
                           "earlier time) after which the run ends as if its steps were "
                           "spent: a last eval, a checkpoint, result.json; 0 = no limit")


@dataclass
class CheckpointConfig:
    every: int = _f(10_000, lo=0, help="env steps between checkpoints; 0 = only at the end")
    replay: bool = _f(True, help="also save the replay buffers (turn off for huge buffers)")
    keep: int = _f(3, lo=1, help="checkpoints kept; older ones are deleted once a newer one "
                   "is safely on disk")


@dataclass
class LogConfig:
    every: int = _f(1_000, lo=1, help="env steps between metric lines")
    tensorboard: bool = _f(True, help="write the metrics to RUN_DIR/tb for TensorBoard")
    progress: bool = _f(True, help="a live progress line on the terminal")
    # The same metrics, config included, to the trackers teams run (optional extras).
    wandb: bool = _f(False, help="log to Weights & Biases (pip install 'qfleet[wandb]')")
    wandb_project: str = _f("qfleet", help="W&B project")
    wandb_entity: str = _f("", help="W&B team or user; '' = your default entity")
    wandb_tags: list[str] = _f([], help="W&B run tags")  # noqa: RUF009
    wandb_mode: str = _f("auto", choices=("auto", "online", "offline", "disabled"),
                         help="auto = the WANDB_MODE environment variable, else online")
    mlflow: bool = _f(False, help="log to MLflow (pip install 'qfleet[mlflow]')")
    mlflow_tracking_uri: str = _f("", help="e.g. 'http://host:5000' or 'sqlite:///mlflow.db'; "
                                  "'' = MLflow's default (MLFLOW_TRACKING_URI)")
    mlflow_experiment: str = _f("qfleet", help="MLflow experiment name")
