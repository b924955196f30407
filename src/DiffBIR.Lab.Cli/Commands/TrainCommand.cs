using System.ComponentModel;
using System.Globalization;
using System.Text.Json.Nodes;
using DiffBIR.Lab.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class TrainSettings : CommandSettings
{
    [CommandOption("--data <PATH>")] [Description("Training images: a folder (recursive) or a file list (one path per line, optionally TAB prompt).")]
    public string? Data { get; set; }
    [CommandOption("-o|--output <RUNDIR>")] [Description("The run directory (config.json, metrics.csv/.jsonl, checkpoints/, samples/).")]
    public string? Output { get; set; }
    [CommandOption("--config <FILE>")] [Description("A JSON object of options (the keys of RUNDIR/config.json's \"options\"); flags override it.")]
    public string? Config { get; set; }
    [CommandOption("--resume <RUNDIR>")] [Description("Continue a run from its newest checkpoint (weights, AdamW state, loader position); its config.json gives the options, --steps may raise the total.")]
    public string? Resume { get; set; }
    [CommandOption("--steps <N>")] [Description("Total optimizer steps (official 150000; tiny 50).")]
    public long? Steps { get; set; }
    [CommandOption("--batch-size <N>")] [Description("Images per micro-batch (official: stage 1 96, stage 2 256 (v2) / 512 (v2.1); tiny 2).")]
    public int? BatchSize { get; set; }
    [CommandOption("--grad-accum <N>")] [Description("Micro-batches per optimizer step (the gradient is their mean). Default 1.")]
    public int? GradAccum { get; set; }
    [CommandOption("--lr <X>")] [Description("AdamW learning rate (official: 1e-4; stage 2 v2.1 1e-5).")]
    public double? Lr { get; set; }
    [CommandOption("--weight-decay <X>")] [Description("AdamW weight decay (official: stage 1 0, stage 2 0.01).")]
    public double? WeightDecay { get; set; }
    [CommandOption("--seed <N>")] [Description("Seed of everything random (init, order, crops, degradations, draws). Default 231.")]
    public long? Seed { get; set; }
    [CommandOption("--out-size <N>")] [Description("Crop size (official 512; tiny 64).")]
    public int? OutSize { get; set; }
    [CommandOption("--val <PATH>")] [Description("Held-out HQ images: PSNR/SSIM of the restored degraded copies every --val-every steps.")]
    public string? Val { get; set; }
    [CommandOption("--variant <V>")] [Description("stage 2: irc (IRControlNet, default), v5 (concat features) or v6 (SFT).")]
    public string? Variant { get; set; }
    [CommandOption("--schedule <S>")] [Description("stage 2: v2 (ε, default) or v2.1 (v-prediction, zero terminal SNR, noise aug 200, second-order degradation).")]
    public string? Schedule { get; set; }
    [CommandOption("--sd <CKPT>")] [Description("stage 2: the Stable Diffusion 2.1 checkpoint the UNet, VAE, CLIP and the ControlNet start from.")]
    public string? Sd { get; set; }
    [CommandOption("--stage1 <CKPT>")] [Description("stage 2: the (frozen) stage-1 SwinIR; stage 1: a SwinIR to start from.")]
    public string? Stage1 { get; set; }
    [CommandOption("--weights <DIR>")] [Description("Folder with the CLIP BPE vocabulary (full-size stage 2). Default weights/.")]
    public string? Weights { get; set; }
    [CommandOption("--tiny")] [Description("Fixture-sized networks with seeded random init (tiny preset's): runs on the CPU in seconds; not a real model.")]
    public bool Tiny { get; set; }
    [CommandOption("--random-init")] [Description("Full-size networks with seeded random weights instead of --sd / --stage1: for timing a step (scripts/gpu/train_stage2_step.sh); not a model.")]
    public bool RandomInit { get; set; }
    [CommandOption("--noise-aug <T>")] public int? NoiseAug { get; set; }
    [CommandOption("--p-empty <P>")] [Description("stage 2: probability of an empty prompt (official v2 0.5, v2.1 0.2).")]
    public double? PEmpty { get; set; }
    [CommandOption("--degradation <KIND>")] [Description("first_order (Eq. 2) or second_order (Real-ESRGAN; v2.1's default).")]
    public string? Degradation { get; set; }
    [CommandOption("--ckpt-every <N>")] public int? CkptEvery { get; set; }
    [CommandOption("--log-every <N>")] public int? LogEvery { get; set; }
    [CommandOption("--val-every <N>")] public int? ValEvery { get; set; }
    [CommandOption("--sample-every <N>")] public int? SampleEvery { get; set; }
    [CommandOption("--sample-steps <N>")] public int? SampleSteps { get; set; }
    [CommandOption("--queue <N>")] [Description("Decoded samples waiting ahead of the loop (bounded queue). Default 16.")]
    public int? Queue { get; set; }
    [CommandOption("--threads <N>")] [Description("CPU threads of libtorch (default: all cores).")]
    public int? Threads { get; set; }
    [CommandOption("--device <D>")] [Description("cpu (default) or cuda.")]
    public string? Device { get; set; }

    /// <summary>The flags given, as option keys (config.json names) → values.</summary>
    internal JsonObject Given(string stage)
    {
        var o = new JsonObject();
        void Set(string k, JsonNode? v) { if (v != null) o[k] = v; }
        Set("data", Data); Set("val", Val); Set("steps", Steps); Set("batch_size", BatchSize); Set("grad_accum", GradAccum);
        Set("lr", Lr); Set("weight_decay", WeightDecay); Set("seed", Seed); Set("out_size", OutSize); Set("variant", Variant);
        Set("schedule", Schedule); Set("sd", Sd); Set("stage1", Stage1); Set("weights", Weights); Set("noise_aug", NoiseAug);
        Set("p_empty", PEmpty); Set("degradation", Degradation); Set("ckpt_every", CkptEvery); Set("log_every", LogEvery);
        Set("val_every", ValEvery); Set("sample_every", SampleEvery); Set("sample_steps", SampleSteps); Set("queue", Queue);
        Set("threads", Threads); Set("device", Device);
        if (Tiny) o["tiny"] = true;
        if (RandomInit) o["random_init"] = true;
        return o;
    }
}

/// <summary>
/// <c>diffbir-lab train stage1|stage2</c>: the official recipes by default, every option overridable by a JSON file
/// and flags, a run directory, resume, Ctrl+C → checkpoint and exit 130. A further stage (prior) is one more
/// <see cref="ITrainer"/> in Trainers.Create and one AddCommand line.
/// </summary>
public sealed class TrainCommand : Command<TrainSettings>
{
    static readonly string[] ResumeOverrides = { "steps", "threads", "device", "log_every", "ckpt_every", "queue" };

    public override int Execute(CommandContext context, TrainSettings s, CancellationToken ct)
    {
        var stage = context.Name;
        var given = s.Given(stage);
        TrainOptions o;
        string runDir;
        bool resume = s.Resume != null;
        if (resume)
        {
            runDir = s.Resume!;
            var cfgPath = Path.Combine(runDir, "config.json");
            if (!File.Exists(cfgPath)) throw new FileNotFoundException($"--resume: {cfgPath}: no such file (not a run directory)");
            if (s.Output != null && Path.GetFullPath(s.Output) != Path.GetFullPath(runDir))
                throw new ArgumentException($"--resume continues in {runDir}; -o {s.Output} names another folder");
            var extra = given.Select(kv => kv.Key).Where(k => !ResumeOverrides.Contains(k)).ToList();
            if (s.Config != null) extra.Add("config");
            if (extra.Count > 0)
                throw new ArgumentException($"--resume: the run's options come from {cfgPath}; only --steps, --threads, --device, --log-every, --ckpt-every, --queue may change (given: {string.Join(", ", extra.Select(k => "--" + k.Replace('_', '-')))})");
            var saved = JsonNode.Parse(File.ReadAllText(cfgPath))?["options"] ?? throw new ArgumentException($"--resume: {cfgPath} has no \"options\"");
            o = TrainOptions.FromJson(saved, cfgPath).Merge(given, "flags");
            if (o.Stage != stage) throw new ArgumentException($"--resume: {runDir} is a {o.Stage} run, not {stage}");
        }
        else
        {
            if (s.Output == null) throw new ArgumentException("-o|--output: required (the run directory)");
            runDir = s.Output;
            JsonObject? file = null;
            if (s.Config != null)
            {
                if (!File.Exists(s.Config)) throw new FileNotFoundException($"--config: {s.Config}: no such file");
                file = JsonNode.Parse(File.ReadAllText(s.Config)) as JsonObject ?? throw new ArgumentException($"--config: {s.Config}: not a JSON object");
                if (file["stage"] is { } st && (string?)st != stage) throw new ArgumentException($"--config: {s.Config} is for {st}, not {stage}");
            }
            bool tiny = s.Tiny || (bool?)file?["tiny"] == true;
            string schedule = s.Schedule ?? (string?)file?["schedule"] ?? "v2";
            o = TrainOptions.Defaults(stage, tiny, schedule);
            if (file != null) o = o.Merge(file, s.Config!);
            o = o.Merge(given, "flags");
            if (File.Exists(runDir)) throw new ArgumentException($"-o: {runDir} is a file, not a run directory");
            if (TrainRun.LatestCheckpoint(runDir) != null || File.Exists(Path.Combine(runDir, "config.json")))
                throw new ArgumentException($"-o: {runDir} already holds a run; continue it with --resume {runDir} or choose another folder");
            if (Directory.Exists(o.Data))
            {
                var data = Path.TrimEndingDirectorySeparator(Path.GetFullPath(o.Data));
                var run = Path.TrimEndingDirectorySeparator(Path.GetFullPath(runDir));
                if (run == data || run.StartsWith(data + Path.DirectorySeparatorChar, StringComparison.Ordinal))
                    throw new ArgumentException($"-o: {runDir} is inside the training folder {o.Data}; its samples would become training images");
            }
        }
        o.Validate();

        torch.set_num_threads(o.Threads ?? Environment.ProcessorCount);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cts.Cancel(); Console.Error.WriteLine("stopping after the current step (a checkpoint is saved)…"); };
        Console.CancelKeyPress += onCancel;
        try
        {
            AnsiConsole.MarkupLine(Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                $"train {stage}{(o.Stage == "stage2" ? $" ({o.Variant}, {o.Schedule})" : "")}{(o.Tiny ? " [tiny: random fixture-sized networks, not a real model]" : o.RandomInit ? " [random full-size networks: timing only]" : "")}: {o.Steps} steps, batch {o.BatchSize}×{o.GradAccum}, lr {o.LearningRate:G3}, wd {o.WeightDecay:G3}, out_size {o.OutSize}, seed {o.Seed} → {runDir}")));
            using var trainer = Trainers.Create(o);
            var run = new TrainRun(o, runDir);
            var result = run.Run(trainer, resume, cts.Token);
            if (result.Interrupted)
            {
                CliErrors.Print($"interrupted at step {result.Step}; checkpoint {result.LastCheckpoint ?? "(none: no step finished)"}; continue with: train {stage} --resume {runDir}");
                return 130;
            }
            var last = result.Metrics.Count > 0 ? result.Metrics[^1] : null;
            AnsiConsole.MarkupLine(Markup.Escape(string.Create(CultureInfo.InvariantCulture,
                $"done: step {result.Step}, loss {last?.Loss:G6}, checkpoint {result.LastCheckpoint}")));
            return 0;
        }
        finally { Console.CancelKeyPress -= onCancel; }
    }
}
