using DiffBIR.Lab.Cli;
using DiffBIR.Lab.Cli.Commands;
using Spectre.Console;
using Spectre.Console.Cli;

// Logs and CI capture output through a pipe; don't wrap long report lines at 80 columns there.
if (Console.IsOutputRedirected) AnsiConsole.Profile.Width = 200;

var app = new CommandApp();
app.Configure(c =>
{
    c.SetApplicationName("diffbir-lab");
    c.AddCommand<DemoCommand>("demo")
        .WithDescription("The main job. Until restoration lands (issues 3-5) it exercises image I/O, checkpoint reading and the parity runner, and says so.");
    c.AddCommand<RestoreCommand>("restore")
        .WithDescription("Restore an image or a folder (presets v1, v2, v2.1, tiny, custom) with every official knob; a JSON manifest beside each output.");
    c.AddBranch("sweep", b =>
    {
        b.SetDescription("Sweep options (guidance scale, patch size, sampler, seed, …) over inputs; a results table per point, resumable and shardable. `sweep SPEC.json -o DIR`, `sweep merge DIR… -o OUT`.");
        b.SetDefaultCommand<SweepCommand>();
        b.AddCommand<SweepMergeCommand>("merge").WithDescription("Join the results tables of sweep shards (one row per point; conflicting duplicates refused).");
    });
    c.AddCommand<MetricsCommand>("metrics")
        .WithDescription("Image-quality metrics (psnr, ssim, lpips, musiq, clipiqa, maniqa, …) over a folder of predictions paired with references by name; CSV per image plus means.");
    c.AddCommand<ParityCommand>("parity")
        .WithDescription("Compare our implementation with the official code on golden fixtures (files or folders).");
    c.AddBranch("weights", w =>
    {
        w.SetDescription("Checkpoint tools.");
        w.AddCommand<WeightsInspectCommand>("inspect").WithDescription("List a checkpoint's tensors and metadata (never executes code from it).");
        w.AddCommand<WeightsFetchCommand>("fetch").WithDescription("Download a preset's official checkpoints into weights/ (progress, resume, SHA-256). The only network access of this tool.");
        w.AddCommand<WeightsListCommand>("list").WithDescription("The official checkpoints of weights/manifest.json, and which are present.");
        w.AddCommand<FitNiqeCommand>("fit-niqe").WithDescription("Fit the pristine model of the weight-free NIQE (metric niqe-lab) on a folder of HQ images.");
        w.AddCommand<TrainTinyCommand>("train-tiny").WithDescription("Train the tiny DiffBIR (preset tiny) on procedural images on the CPU; writes weights/tiny and its recipe.json.");
    });
    c.AddBranch("train", t =>
    {
        t.SetDescription("Training (official recipes by default; --tiny for fixture-sized networks on the CPU).");
        t.AddCommand<TrainCommand>("stage1").WithDescription("Train the stage-1 SwinIR on first-order (Eq. 2) pairs: summed MSE, AdamW.");
        t.AddCommand<TrainCommand>("stage2").WithDescription("Train IRControlNet (or --variant v5 / v6) on a frozen SD 2.1 and stage-1 model: ε (v2) or v (v2.1) loss.");
        t.AddCommand<TrainCommand>("prior").WithDescription("Train the UNet as a latent diffusion prior (VAE and CLIP frozen): ε (v2) or v (v2.1) loss on VAE latents of HQ images.");
    });
    c.AddBranch("bench", b =>
    {
        b.SetDescription("Benchmarks (not tests).");
        b.AddCommand<BenchBuildCommand>("build").WithDescription("Build the full-size networks on the CPU (float32) and report time, parameters and memory.");
        b.AddCommand<BenchPipelineCommand>("pipeline").WithDescription("Time the full-size v2 pipeline (random weights): s/image, peak memory per stage, counted FLOPs, FLOP/s and its fraction of the measured matmul peak.");
        b.AddCommand<BenchMetricsCommand>("metrics").WithDescription("Images/s of each image-quality metric on the CPU (random weights, timing only).");
        b.AddCommand<BenchMemoryCommand>("memory").WithDescription("Run the tiny pipeline N times in one process; print RSS and live tensors per run.");
    });
    c.AddBranch("notebooks", n =>
    {
        n.SetDescription("Polyglot (.ipynb) notebooks.");
        n.AddCommand<NotebooksRunCommand>("run").WithDescription("Execute notebooks headlessly, cell by cell; stop at the first failing cell.");
    });
    c.PropagateExceptions();
    c.UseStrictParsing();
});

// Exit codes (README, "Errors and exit codes"): 0 done; 1 some inputs of a folder failed (the others were done) or a
// check failed (parity, notebooks); 2 bad input (option, file, checkpoint) — nothing was written; 70 internal error;
// 130 interrupted (Ctrl+C). Every error is one line on stderr; DIFFBIR_LAB_TRACE=1 adds the stack trace.
try
{
    return app.Run(args);
}
catch (Exception e)
{
    var inner = CliErrors.Unwrap(e);
    if (inner is CommandAppException or CommandParseException || CliErrors.IsUserError(inner))
    {
        CliErrors.Print(inner is OperationCanceledException ? "interrupted" : CliErrors.NameOption(inner.Message, args));
        return inner is OperationCanceledException ? 130 : 2;
    }
    CliErrors.Print($"internal error ({inner.GetType().Name}): {inner.Message} — please report it; DIFFBIR_LAB_TRACE=1 shows where");
    if (Environment.GetEnvironmentVariable("DIFFBIR_LAB_TRACE") == "1") Console.Error.WriteLine(inner);
    return 70;
}
