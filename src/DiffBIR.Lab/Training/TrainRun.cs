using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using DiffBIR.Lab.Checkpoints;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>
/// Everything a training run is made of, as written to RUNDIR/config.json (snake_case keys; a <c>--config</c> file
/// uses the same keys). <see cref="Defaults"/> gives the official recipes; <c>tiny</c> the fixture-sized networks.
/// </summary>
public sealed record TrainOptions
{
    [JsonPropertyName("stage")] public string Stage { get; init; } = "stage1";
    [JsonPropertyName("data")] public string Data { get; init; } = "";
    [JsonPropertyName("val")] public string? Val { get; init; }
    [JsonPropertyName("steps")] public long Steps { get; init; } = 150_000;
    [JsonPropertyName("batch_size")] public int BatchSize { get; init; } = 96;
    /// <summary>Micro-batches per optimizer step; the gradient is their mean (accelerate's convention).</summary>
    [JsonPropertyName("grad_accum")] public int GradAccum { get; init; } = 1;
    [JsonPropertyName("lr")] public double LearningRate { get; init; } = 1e-4;
    [JsonPropertyName("weight_decay")] public double WeightDecay { get; init; }
    [JsonPropertyName("seed")] public long Seed { get; init; } = 231;
    [JsonPropertyName("out_size")] public int OutSize { get; init; } = 512;
    [JsonPropertyName("tiny")] public bool Tiny { get; init; }
    /// <summary>Full-size networks with seeded random weights instead of --sd / --stage1 (timing runs; not a model).</summary>
    [JsonPropertyName("random_init")] public bool RandomInit { get; init; }
    /// <summary>Stage 2: irc (IRControlNet), v5 (concat features) or v6 (SFT).</summary>
    [JsonPropertyName("variant")] public string Variant { get; init; } = "irc";
    /// <summary>Stage 2: v2 (ε, linear) or v2.1 (v-prediction, zero terminal SNR).</summary>
    [JsonPropertyName("schedule")] public string Schedule { get; init; } = "v2";
    [JsonPropertyName("sd")] public string? Sd { get; init; }
    [JsonPropertyName("stage1")] public string? Stage1 { get; init; }
    /// <summary>Folder with the BPE vocabulary (full-size stage 2).</summary>
    [JsonPropertyName("weights")] public string Weights { get; init; } = "weights";
    [JsonPropertyName("noise_aug")] public int NoiseAug { get; init; }
    [JsonPropertyName("p_empty")] public double EmptyPromptProbability { get; init; }
    /// <summary>first_order (Eq. 2) or second_order (Real-ESRGAN, v2.1).</summary>
    [JsonPropertyName("degradation")] public string Degradation { get; init; } = "first_order";
    [JsonPropertyName("ckpt_every")] public int CheckpointEvery { get; init; } = 10_000;
    [JsonPropertyName("log_every")] public int LogEvery { get; init; } = 50;
    [JsonPropertyName("val_every")] public int ValEvery { get; init; } = 10_000;
    [JsonPropertyName("sample_every")] public int SampleEvery { get; init; } = 10_000;
    /// <summary>Sampler steps of stage-2 samples and validation (spaced sampler, cfg 1).</summary>
    [JsonPropertyName("sample_steps")] public int SampleSteps { get; init; } = 50;
    [JsonPropertyName("queue")] public int Queue { get; init; } = 16;
    [JsonPropertyName("threads")] public int? Threads { get; init; }
    [JsonPropertyName("device")] public string Device { get; init; } = "cpu";

    /// <summary>
    /// The official recipes. Stage 1 (train_stage1.yaml): batch 96, AdamW lr 1e-4, wd 0, 150k steps, out_size 512,
    /// first-order degradation. Stage 2 v2 (train_stage2.yaml): batch 256, lr 1e-4, wd 0.01, ε, prompt dropout 0.5,
    /// first-order degradation; v2.1: batch 512, lr 1e-5, wd 0.01, v, noise_aug 200, p_empty 0.2, second order.
    /// Tiny: fixture-sized networks, out_size 64, batch 2, 50 steps, checkpoints every 25.
    /// </summary>
    public static TrainOptions Defaults(string stage, bool tiny, string schedule = "v2")
    {
        var o = new TrainOptions { Stage = stage, Tiny = tiny, Schedule = schedule };
        if (stage == "prior")
            o = o with { BatchSize = 256, LearningRate = 1e-4, WeightDecay = 0.01, EmptyPromptProbability = 0.1, ValEvery = 0 };
        if (stage == "stage2")
        {
            bool v21 = schedule == "v2.1";
            o = o with
            {
                BatchSize = v21 ? 512 : 256, LearningRate = v21 ? 1e-5 : 1e-4, WeightDecay = 0.01, NoiseAug = v21 ? 200 : 0,
                EmptyPromptProbability = v21 ? 0.2 : 0.5, Degradation = v21 ? "second_order" : "first_order",
            };
        }
        if (tiny)
            o = o with { OutSize = 64, BatchSize = 2, Steps = 50, CheckpointEvery = 25, LogEvery = 10, ValEvery = stage == "prior" ? 0 : 25, SampleEvery = 25, SampleSteps = 2, Queue = 4 };
        return o;
    }

    static readonly JsonSerializerOptions Json = new() { WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.Never };

    public JsonObject ToJson() => JsonSerializer.SerializeToNode(this, Json)!.AsObject();

    /// <summary>These options with the keys of <paramref name="overrides"/> replaced; an unknown key is an error naming it.</summary>
    public TrainOptions Merge(JsonObject overrides, string source)
    {
        var node = ToJson();
        foreach (var (k, v) in overrides)
        {
            if (!node.ContainsKey(k))
                throw new ArgumentException($"{source}: unknown key '{k}' (known: {string.Join(", ", node.Select(kv => kv.Key))})");
            node[k] = v?.DeepClone();
        }
        try { return node.Deserialize<TrainOptions>(Json)!; }
        catch (JsonException e) { throw new ArgumentException($"{source}: {e.Message}"); }
    }

    public static TrainOptions FromJson(JsonNode node, string source)
    {
        try { return node.Deserialize<TrainOptions>(Json) ?? throw new ArgumentException($"{source}: empty"); }
        catch (JsonException e) { throw new ArgumentException($"{source}: {e.Message}"); }
    }

    /// <summary>Checks every value; the first problem is an <see cref="ArgumentException"/> naming the option.</summary>
    public void Validate()
    {
        static void Require(bool ok, string message) { if (!ok) throw new ArgumentException(message); }
        Require(Stage is "stage1" or "stage2" or "prior", $"stage: must be stage1, stage2 or prior (got '{Stage}')");
        Require(!string.IsNullOrWhiteSpace(Data), "--data: required (a folder of HQ images or a file list)");
        Require(Steps >= 1, $"--steps: must be ≥ 1 (got {Steps})");
        Require(BatchSize >= 1, $"--batch-size: must be ≥ 1 (got {BatchSize})");
        Require(GradAccum >= 1, $"--grad-accum: must be ≥ 1 (got {GradAccum})");
        Require(double.IsFinite(LearningRate) && LearningRate > 0, $"--lr: must be a finite number above 0 (got {LearningRate})");
        Require(double.IsFinite(WeightDecay) && WeightDecay >= 0, $"--weight-decay: must be a finite number ≥ 0 (got {WeightDecay})");
        Require(Seed >= 0, $"--seed: must be ≥ 0 (got {Seed})");
        // SwinIR (both stages) unshuffles by 8 and attends in 8×8 windows: the crop side must be a multiple of 64.
        Require(OutSize >= 64 && OutSize % 64 == 0, $"--out-size: must be a multiple of 64 (SwinIR's ×8 unshuffle and 8×8 windows; got {OutSize})");
        Require(Variant is "irc" or "v5" or "v6", $"--variant: must be irc, v5 or v6 (got '{Variant}')");
        Require(Schedule is "v2" or "v2.1", $"--schedule: must be v2 or v2.1 (got '{Schedule}')");
        Require(Degradation is "first_order" or "second_order", $"--degradation: must be first_order or second_order (got '{Degradation}')");
        Require(NoiseAug is >= 0 and <= 1000, $"--noise-aug: must be in 0..1000 (got {NoiseAug})");
        Require(EmptyPromptProbability is >= 0 and <= 1, $"--p-empty: must be in [0, 1] (got {EmptyPromptProbability})");
        Require(CheckpointEvery >= 0 && LogEvery >= 1 && ValEvery >= 0 && SampleEvery >= 0,
            "--ckpt-every, --val-every, --sample-every must be ≥ 0 (0: off) and --log-every ≥ 1");
        Require(SampleSteps >= 1, $"--sample-steps: must be ≥ 1 (got {SampleSteps})");
        Require(Queue >= 1, $"--queue: must be ≥ 1 (got {Queue})");
        Require(Threads is null or (>= 1 and <= 1024), $"--threads: must be in 1..1024 (got {Threads})");
        Require(Device is "cpu" or "cuda", $"--device: must be cpu or cuda (got '{Device}')");
        Require(Stage == "stage2" || Variant == "irc", "--variant: only for stage2");
        Require(Stage != "prior" || Val == null, "--val: a prior restores nothing; validation is for stage1 and stage2");
        Require(Stage != "prior" || Stage1 == null, "--stage1: the prior trains the UNet alone");
        Require(Stage != "prior" || Tiny || RandomInit || Sd != null, "--sd: the prior at full size starts from a Stable Diffusion 2.1 checkpoint (VAE and CLIP frozen, the UNet trained)");
        if (Stage == "stage2" && !Tiny && !RandomInit)
        {
            Require(Sd != null, "--sd: stage 2 at full size starts from a Stable Diffusion 2.1 checkpoint (give its path)");
            Require(Stage1 != null, "--stage1: stage 2 at full size needs the stage-1 SwinIR checkpoint");
        }
        foreach (var (opt, path) in new[] { ("--sd", Sd), ("--stage1", Stage1) })
            if (path != null && !File.Exists(path)) throw new FileNotFoundException($"{opt}: {path}: no such file");
        if (!Directory.Exists(Data) && !File.Exists(Data)) throw new FileNotFoundException($"--data: {Data}: no such folder or file list");
        if (Val != null && !Directory.Exists(Val) && !File.Exists(Val)) throw new FileNotFoundException($"--val: {Val}: no such folder or file list");
    }

    /// <summary>The loader settings these options stand for.</summary>
    public TrainingDataOptions DataOptions() => new()
    {
        OutSize = OutSize, BatchSize = BatchSize, Seed = Seed, QueueCapacity = Queue,
        Degradation = Degradation == "second_order" ? TrainingDegradation.SecondOrder : TrainingDegradation.FirstOrder,
        EmptyPromptProbability = Stage is "stage2" or "prior" ? EmptyPromptProbability : 0,
    };
}

/// <summary>
/// What the generic loop of <see cref="TrainRun"/> needs from a stage: the module whose state dict is the checkpoint
/// (official keys), its optimizer, and the loss of one micro-batch. Stage 1, stage 2 (and its variants) implement
/// it (<see cref="Trainers"/>); a UNet-prior trainer is one more implementation plus a line in <see cref="Trainers.Create"/>.
/// </summary>
public interface ITrainer : IDisposable
{
    string Stage { get; }
    /// <summary>Saved in checkpoints/step_N.safetensors (and reloaded on resume) with its state-dict keys.</summary>
    nn.Module Trainable { get; }
    optim.Optimizer Optimizer { get; }
    /// <summary>Written into every checkpoint's metadata (stage, variant, schedule…).</summary>
    IReadOnlyDictionary<string, string> CheckpointMetadata { get; }
    /// <summary>The loss of one micro-batch with its graph, in the caller's dispose scope; random draws from <paramref name="draws"/>.</summary>
    Tensor Loss(TrainingBatch batch, ITrainingDraws draws);
    /// <summary>Restored images [N,3,H,W] in [0, 1] from lq [N,3,H,W] in [0, 1] (eval mode, no gradients), for validation and samples.</summary>
    Tensor Restore(Tensor lqNchw, long seed);
    /// <summary>Whether samples/ images are written (stage 2).</summary>
    bool WritesSamples { get; }
}

/// <summary>One row of metrics.csv / metrics.jsonl.</summary>
/// <param name="Seconds">wall time of the step (loader wait included)</param>
/// <param name="DataSeconds">of which waiting for the loader</param>
public sealed record MetricRow(long Step, double Loss, double LearningRate, double Seconds, double? ValPsnr = null, double? ValSsim = null, double DataSeconds = 0);

/// <summary>How a run ended.</summary>
public sealed record TrainResult(long Step, bool Interrupted, string? LastCheckpoint, IReadOnlyList<MetricRow> Metrics);

/// <summary>
/// The training loop and its run directory:
/// <code>
/// RUNDIR/config.json            every option + the manifest (RunInfo.Manifest)
/// RUNDIR/metrics.csv|.jsonl     step, loss, lr, seconds, data_seconds (+ val_psnr, val_ssim at validation steps)
/// RUNDIR/checkpoints/step_N.safetensors        the trainable module's state dict (official keys) + metadata
/// RUNDIR/checkpoints/step_N.optim.safetensors  AdamW exp_avg / exp_avg_sq per parameter, step counts in metadata
/// RUNDIR/checkpoints/step_N.json               step, loader position (written last: a checkpoint without it is incomplete)
/// RUNDIR/samples/step_N.png     lq | restored | gt (stage 2)
/// </code>
/// Each step runs in its own dispose scope; its random draws come from a generator seeded by (seed, step, micro-batch)
/// and the loader's from (seed, epoch, index), so a run resumed from a checkpoint continues bit-identically on the CPU.
/// </summary>
public sealed class TrainRun
{
    public TrainOptions Options { get; }
    public string RunDir { get; }
    public TextWriter Log { get; init; } = Console.Error;
    /// <summary>Called after each step (for tests and UIs).</summary>
    public Action<MetricRow>? OnStep { get; init; }

    public TrainRun(TrainOptions options, string runDir) { Options = options; RunDir = runDir; }

    public string CheckpointDir => Path.Combine(RunDir, "checkpoints");

    /// <summary>The newest complete checkpoint of a run directory: (step, path of step_N.safetensors), or null.</summary>
    public static (long Step, string Path)? LatestCheckpoint(string runDir)
    {
        var dir = Path.Combine(runDir, "checkpoints");
        if (!Directory.Exists(dir)) return null;
        (long, string)? best = null;
        foreach (var f in Directory.EnumerateFiles(dir, "step_*.json"))
        {
            var name = Path.GetFileNameWithoutExtension(f);
            if (!long.TryParse(name["step_".Length..], NumberStyles.None, CultureInfo.InvariantCulture, out var step)) continue;
            var weights = Path.Combine(dir, name + ".safetensors");
            if (File.Exists(weights) && File.Exists(Path.Combine(dir, name + ".optim.safetensors")) && (best is null || step > best.Value.Item1))
                best = (step, weights);
        }
        return best;
    }

    /// <summary>
    /// Trains from scratch, or from the newest checkpoint of <see cref="RunDir"/> when <paramref name="resume"/> is
    /// set, until <see cref="TrainOptions.Steps"/>. Cancellation stops after the current step, saves a checkpoint and
    /// returns with <see cref="TrainResult.Interrupted"/>.
    /// </summary>
    public TrainResult Run(ITrainer trainer, bool resume, CancellationToken ct = default)
    {
        var o = Options;
        Directory.CreateDirectory(RunDir);
        long step = 0, position = 0;
        var metrics = new List<MetricRow>();
        string? lastCkpt = null;
        if (resume)
        {
            var latest = LatestCheckpoint(RunDir) ?? throw new ArgumentException($"--resume: {RunDir}: no complete checkpoint in {CheckpointDir}");
            if (latest.Step >= o.Steps)
                throw new ArgumentException($"--steps: the run in {RunDir} is already at step {latest.Step} (of {o.Steps}); give a larger --steps to continue it");
            (step, position) = LoadCheckpoint(trainer, latest.Path);
            lastCkpt = latest.Path;
            metrics.AddRange(ReadMetrics(Path.Combine(RunDir, "metrics.jsonl")).Where(r => r.Step <= step));
            Log.WriteLine($"resumed from {latest.Path} (step {step})");
        }
        var config = new JsonObject
        {
            ["options"] = o.ToJson(),
            ["manifest"] = RunInfo.Manifest(o.Device, o.Seed),
            ["resumed_from"] = lastCkpt,
        };
        AtomicFile.WriteAllText(Path.Combine(RunDir, "config.json"), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));

        var items = TrainingSet.Find(o.Data);
        var val = o.Val != null && (o.ValEvery > 0) ? LoadValidation(o) : null;
        using var loader = new TrainingLoader(items, o.DataOptions(), position, Log);
        var lr = o.LearningRate;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        long startStep = step;
        bool interrupted = false;
        TrainingBatch? sampleBatch = null;
        try
        {
            while (step < o.Steps)
            {
                if (ct.IsCancellationRequested) { interrupted = true; break; }
                var t0 = clock.Elapsed.TotalSeconds;
                double loss, dataSeconds;
                try { (loss, dataSeconds) = OneStep(trainer, loader, step, ct, ref sampleBatch); }
                catch (OperationCanceledException) when (ct.IsCancellationRequested) { interrupted = true; break; }
                step++;
                position = loader.Position;
                var row = new MetricRow(step, loss, lr, clock.Elapsed.TotalSeconds - t0, DataSeconds: dataSeconds);
                if (!double.IsFinite(loss))
                    throw new Pipeline.NonFiniteException($"the loss became {loss} at step {step}; lower --lr (checkpoints so far are kept)");
                if (val != null && o.ValEvery > 0 && (step % o.ValEvery == 0 || step == o.Steps))
                {
                    var (psnr, ssim) = Validate(trainer, val, o.Seed);
                    row = row with { ValPsnr = psnr, ValSsim = ssim };
                    Log.WriteLine($"step {step}: validation PSNR {psnr:F3} dB, SSIM {ssim:F4} ({val.Count} images)");
                }
                metrics.Add(row);
                OnStep?.Invoke(row);
                if (trainer.WritesSamples && o.SampleEvery > 0 && step % o.SampleEvery == 0 && sampleBatch != null)
                    WriteSample(trainer, sampleBatch, step, o.Seed);
                bool ckpt = o.CheckpointEvery > 0 && step % o.CheckpointEvery == 0 || step == o.Steps;
                if (ckpt) lastCkpt = SaveCheckpoint(trainer, step, position);
                if (ckpt || step % o.LogEvery == 0) WriteMetrics(metrics);
                if (step % o.LogEvery == 0 || step == o.Steps || !Console.IsErrorRedirected)
                    Progress(step, o.Steps, loss, lr, clock.Elapsed.TotalSeconds, step - startStep);
            }
            if (interrupted && step > 0 && (lastCkpt is null || !lastCkpt.EndsWith($"step_{step}.safetensors", StringComparison.Ordinal)))
                lastCkpt = SaveCheckpoint(trainer, step, position);
            WriteMetrics(metrics);
        }
        finally { sampleBatch?.Dispose(); }
        if (!Console.IsErrorRedirected) Log.WriteLine();
        return new TrainResult(step, interrupted, lastCkpt, metrics);
    }

    (double Loss, double DataSeconds) OneStep(ITrainer trainer, TrainingLoader loader, long step, CancellationToken ct, ref TrainingBatch? sampleBatch)
    {
        var wait = new System.Diagnostics.Stopwatch();
        using var scope = NewDisposeScope();
        var opt = trainer.Optimizer;
        opt.zero_grad();
        double sum = 0;
        int accum = Options.GradAccum;
        for (int micro = 0; micro < accum; micro++)
        {
            wait.Start();
            using var batch = loader.Next(ct);
            wait.Stop();
            using var draws = new SeededTrainingDraws((long)(TrainingSeeds.Derive(Options.Seed, TrainingSeeds.StepDraws, step, micro) >> 1));
            var loss = trainer.Loss(batch, draws);
            (accum == 1 ? loss : loss / accum).backward();
            sum += loss.item<float>();
            if (sampleBatch is null && trainer.WritesSamples)
                sampleBatch = new TrainingBatch(batch.Gt.narrow(0, 0, 1).clone().MoveToOuterDisposeScope(), batch.Lq.narrow(0, 0, 1).clone().MoveToOuterDisposeScope(),
                    new[] { batch.Prompts[0] }, new[] { batch.Files[0] }, batch.Start, batch.Start + 1);
        }
        opt.step();
        return (sum / accum, wait.Elapsed.TotalSeconds);
    }

    void Progress(long step, long total, double loss, double lr, double seconds, long stepsThisRun)
    {
        double per = stepsThisRun > 0 ? seconds / stepsThisRun : 0;
        var eta = TimeSpan.FromSeconds(per * (total - step));
        var line = string.Create(CultureInfo.InvariantCulture,
            $"step {step}/{total}  loss {loss:G6}  lr {lr:G3}  {per:F2} s/step  ETA {(int)eta.TotalHours}h{eta.Minutes:00}m{eta.Seconds:00}s");
        if (Console.IsErrorRedirected || !ReferenceEquals(Log, Console.Error)) Log.WriteLine(line);
        else Log.Write("\r" + line.PadRight(90));
    }

    // ---- checkpoints ----

    string SaveCheckpoint(ITrainer trainer, long step, long position)
    {
        Directory.CreateDirectory(CheckpointDir);
        var baseName = Path.Combine(CheckpointDir, $"step_{step}");
        var meta = new Dictionary<string, string>(trainer.CheckpointMetadata) { ["seed"] = Options.Seed.ToString(CultureInfo.InvariantCulture) };
        TrainingCheckpoint.Save(trainer.Trainable, baseName + ".safetensors", step, meta);
        OptimizerState.Save(trainer.Optimizer, trainer.Trainable, baseName + ".optim.safetensors");
        var state = new JsonObject
        {
            ["step"] = step,
            ["loader_position"] = position,
            ["stage"] = trainer.Stage,
            ["seed"] = Options.Seed,
            ["weights"] = Path.GetFileName(baseName + ".safetensors"),
            ["optimizer"] = Path.GetFileName(baseName + ".optim.safetensors"),
        };
        AtomicFile.WriteAllText(baseName + ".json", state.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        return baseName + ".safetensors";
    }

    static (long Step, long Position) LoadCheckpoint(ITrainer trainer, string weightsPath)
    {
        var baseName = weightsPath[..^".safetensors".Length];
        var state = JsonNode.Parse(File.ReadAllText(baseName + ".json"))!;
        var content = SafeTensors.Load(weightsPath);
        try
        {
            if (content.Metadata.TryGetValue("stage", out var stage) && stage != trainer.Stage)
                throw new ArgumentException($"--resume: {weightsPath} is a {stage} checkpoint, not {trainer.Stage}");
            StateDictLoader.Load(trainer.Trainable, content.Tensors, strict: true, sourceName: weightsPath);
        }
        finally { foreach (var t in content.Tensors.Values) t.Dispose(); }
        OptimizerState.Load(trainer.Optimizer, trainer.Trainable, baseName + ".optim.safetensors");
        return ((long)state["step"]!, (long)state["loader_position"]!);
    }

    // ---- metrics ----

    void WriteMetrics(IReadOnlyList<MetricRow> rows)
    {
        static string N(double? x) => x is double v ? v.ToString("R", CultureInfo.InvariantCulture) : "";
        var csv = new System.Text.StringBuilder("step,loss,lr,seconds,data_seconds,val_psnr,val_ssim\n");
        var jsonl = new System.Text.StringBuilder();
        foreach (var r in rows)
        {
            csv.Append(CultureInfo.InvariantCulture, $"{r.Step},{N(r.Loss)},{N(r.LearningRate)},{r.Seconds.ToString("F4", CultureInfo.InvariantCulture)},{r.DataSeconds.ToString("F4", CultureInfo.InvariantCulture)},{N(r.ValPsnr)},{N(r.ValSsim)}\n");
            var o = new JsonObject { ["step"] = r.Step, ["loss"] = r.Loss, ["lr"] = r.LearningRate, ["seconds"] = Math.Round(r.Seconds, 4), ["data_seconds"] = Math.Round(r.DataSeconds, 4) };
            if (r.ValPsnr is double p) o["val_psnr"] = p;
            if (r.ValSsim is double s) o["val_ssim"] = s;
            jsonl.Append(o.ToJsonString()).Append('\n');
        }
        AtomicFile.WriteAllText(Path.Combine(RunDir, "metrics.csv"), csv.ToString());
        AtomicFile.WriteAllText(Path.Combine(RunDir, "metrics.jsonl"), jsonl.ToString());
    }

    /// <summary>The rows of a metrics.jsonl (empty when there is none).</summary>
    public static List<MetricRow> ReadMetrics(string path)
    {
        var rows = new List<MetricRow>();
        if (!File.Exists(path)) return rows;
        foreach (var line in File.ReadLines(path))
        {
            if (line.Trim().Length == 0) continue;
            var n = JsonNode.Parse(line)!;
            rows.Add(new MetricRow((long)n["step"]!, (double)n["loss"]!, (double)n["lr"]!, (double)n["seconds"]!,
                (double?)n["val_psnr"], (double?)n["val_ssim"], (double?)n["data_seconds"] ?? 0));
        }
        return rows;
    }

    // ---- validation and samples ----

    /// <summary>Fixed validation pairs: each image of --val cropped and degraded once with draws derived from the seed.</summary>
    public sealed record ValidationSet(IReadOnlyList<(Tensor Gt, Tensor Lq)> Pairs)
    {
        public int Count => Pairs.Count;
    }

    ValidationSet LoadValidation(TrainOptions o)
    {
        var items = TrainingSet.Find(o.Val!);
        var opts = o.DataOptions() with
        {
            BatchSize = 1, HorizontalFlip = false, EmptyPromptProbability = 0, QueueCapacity = 2,
            Seed = (long)(TrainingSeeds.Derive(o.Seed, TrainingSeeds.Validation) >> 1),
        };
        var pairs = new List<(Tensor, Tensor)>();
        using var loader = new TrainingLoader(items, opts, 0, Log);
        while (loader.Position < items.Count)
        {
            using var b = loader.Next();
            // NHWC, gt in [−1, 1] → NCHW in [0, 1]
            pairs.Add((((b.Gt + 1) / 2).permute(0, 3, 1, 2).contiguous(), b.Lq.permute(0, 3, 1, 2).contiguous()));
        }
        return new ValidationSet(pairs);
    }

    static (double Psnr, double Ssim) Validate(ITrainer trainer, ValidationSet val, long seed)
    {
        double psnr = 0, ssim = 0;
        foreach (var (gt, lq) in val.Pairs)
        {
            using var scope = NewDisposeScope();
            var pred = trainer.Restore(lq, seed).cpu().to(ScalarType.Float32);
            psnr += ImageMetrics.Psnr(pred, gt).mean().item<double>();
            ssim += ImageMetrics.Ssim(pred, gt).mean().item<double>();
        }
        return (psnr / val.Count, ssim / val.Count);
    }

    void WriteSample(ITrainer trainer, TrainingBatch b, long step, long seed)
    {
        using var scope = NewDisposeScope();
        var lq = b.Lq.permute(0, 3, 1, 2).contiguous();
        var gt = ((b.Gt + 1) / 2).permute(0, 3, 1, 2).contiguous();
        var pred = trainer.Restore(lq, seed).cpu().to(ScalarType.Float32);
        var grid = cat(new[] { lq, pred, gt }, 3).clamp(0, 1);
        ImageIO.Save(Path.Combine(RunDir, "samples", $"step_{step}.png"), grid, Quantization.Round);
    }
}

/// <summary>
/// AdamW's state saved as safetensors: <c>exp_avg.&lt;param&gt;</c> and <c>exp_avg_sq.&lt;param&gt;</c> (keys = the
/// trainable module's parameter names) and each parameter's step count in the metadata (<c>step.&lt;param&gt;</c>).
/// </summary>
public static class OptimizerState
{
    public static void Save(optim.Optimizer optimizer, nn.Module module, string path)
    {
        var names = module.named_parameters().Select(kv => kv.name).ToList();
        var sd = ((OptimizerHelper)optimizer).state_dict();
        if (sd.State.Count != names.Count)
            throw new InvalidOperationException($"the optimizer holds {sd.State.Count} parameters, the module {names.Count}");
        var tensors = new Dictionary<string, Tensor>();
        var meta = new Dictionary<string, string> { ["format"] = "pt", ["optimizer"] = "AdamW" };
        for (int i = 0; i < names.Count; i++)
        {
            var s = (AdamW.State)sd.State[i];
            if (s.exp_avg is not null) tensors["exp_avg." + names[i]] = s.exp_avg;
            if (s.exp_avg_sq is not null) tensors["exp_avg_sq." + names[i]] = s.exp_avg_sq;
            meta["step." + names[i]] = s.step.ToString(CultureInfo.InvariantCulture);
        }
        SafeTensors.Save(path, tensors, meta);
    }

    public static void Load(optim.Optimizer optimizer, nn.Module module, string path)
    {
        var names = module.named_parameters().Select(kv => kv.name).ToList();
        var content = SafeTensors.Load(path);
        var helper = (OptimizerHelper)optimizer;
        var sd = helper.state_dict();
        if (sd.State.Count != names.Count)
            throw new InvalidOperationException($"the optimizer holds {sd.State.Count} parameters, the module {names.Count}");
        using (no_grad())
        {
            for (int i = 0; i < names.Count; i++)
            {
                var s = (AdamW.State)sd.State[i];
                if (!content.Metadata.TryGetValue("step." + names[i], out var st))
                    throw new CheckpointException(path, $"no optimizer state for parameter '{names[i]}'");
                s.step = long.Parse(st, CultureInfo.InvariantCulture);
                foreach (var (key, get, set) in new (string, Func<Tensor?>, Action<Tensor>)[]
                         {
                             ("exp_avg." + names[i], () => s.exp_avg, t => s.exp_avg = t),
                             ("exp_avg_sq." + names[i], () => s.exp_avg_sq, t => s.exp_avg_sq = t),
                         })
                {
                    if (!content.Tensors.TryGetValue(key, out var saved)) continue;
                    var current = get();
                    if (current is null) set(saved.clone());
                    else
                    {
                        if (!current.shape.SequenceEqual(saved.shape))
                            throw new CheckpointException(path, $"{key}: shape [{string.Join(",", saved.shape)}], the parameter has [{string.Join(",", current.shape)}]");
                        current.copy_(saved);
                    }
                }
            }
        }
        helper.load_state_dict(sd);
        foreach (var t in content.Tensors.Values) t.Dispose();
    }
}
