using System.ComponentModel;
using DiffBIR.Lab.Pipeline;
using DiffBIR.Lab.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class TrainTinySettings : CommandSettings
{
    [CommandOption("-o|--output <DIR>")] [Description("Where the weights and recipe.json go (default: the repository's weights/tiny).")]
    public string? Output { get; set; }
    [CommandOption("--seed <N>")] [Description("Seed of data, initialisation and every draw (default 2026, the committed weights).")]
    public long Seed { get; set; } = 2026;
    [CommandOption("--threads <N>")] [Description("torch threads, fixed for the run; the weights depend on it (default 1, the committed weights: these small tensors run faster on one thread).")]
    public int Threads { get; set; } = 1;
    [CommandOption("--steps <N>")] [Description("Smoke run: N steps per stage on 8 images instead of the recipe (not the committed weights).")]
    public int? Steps { get; set; }

    [CommandOption("--evaluate")] [Description("Do not train: measure the weights in the output folder on held-out images (docs/tiny-preset.md).")]
    public bool Evaluate { get; set; }
    [CommandOption("--eval-images <N>")] [Description("Held-out images of --evaluate (default 16).")]
    public int EvalImages { get; set; } = 16;
    [CommandOption("--grid <PNG>")] [Description("With --evaluate: write the image grid (LQ, stage 1, stage 2 at s = 0 and at the largest s, HQ) here.")]
    public string? Grid { get; set; }
    [CommandOption("--eval-sampler <NAME>")] [Description("With --evaluate: the sampler of the main measurements (default: the preset's).")]
    public string? EvalSampler { get; set; }
    [CommandOption("--sweep-samplers <LIST>")] [Description("With --evaluate: comma-separated samplers of the guidance sweep, 'none' to skip (default: every sampler).")]
    public string? SweepSamplers { get; set; }
    [CommandOption("--report <MD>")] [Description("With --evaluate: write the markdown report here too.")]
    public string? Report { get; set; }

    public override ValidationResult Validate()
    {
        if (Seed < 0) return ValidationResult.Error($"--seed: must be ≥ 0 (got {Seed})");
        if (Threads < 1 || Threads > 256) return ValidationResult.Error($"--threads: must be in 1…256 (got {Threads})");
        if (EvalImages < 1) return ValidationResult.Error($"--eval-images: must be ≥ 1 (got {EvalImages})");
        if (Steps is < 1) return ValidationResult.Error($"--steps: must be ≥ 1 (got {Steps})");
        if (Output is { } o && File.Exists(o)) return ValidationResult.Error($"--output: {o} is a file, not a folder");
        return ValidationResult.Success();
    }
}

/// <summary>
/// <c>diffbir-lab weights train-tiny</c>: trains the tiny DiffBIR (VAE → UNet prior → stage 1 → IRControlNet) on
/// procedural images with <see cref="TinyRecipe"/> and writes weights/tiny/*.safetensors and recipe.json.
/// </summary>
public sealed class TrainTinyCommand : Command<TrainTinySettings>
{
    public override int Execute(CommandContext context, TrainTinySettings s, CancellationToken ct)
    {
        var output = s.Output ?? Path.Combine(Path.GetDirectoryName(Presets.FindManifest())!, "tiny");
        if (s.Evaluate)
        {
            torch.set_num_threads(s.Threads);
            using var preset = Presets.Build(Presets.Tiny, RestorationTask.Sr, output, new BuildOptions { Upscale = 1, TinyWeightsDir = output });
            var sweep = s.SweepSamplers is null ? null : s.SweepSamplers == "none" ? Array.Empty<string>() : s.SweepSamplers.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            var report = TinyRecipeEvaluation.Run(preset, new TinyEvaluationOptions { Images = s.EvalImages, DataSeed = s.Seed, SweepImages = Math.Min(2, s.EvalImages), SweepSamplers = sweep, Sampler = s.EvalSampler },
                s.Grid, line => AnsiConsole.WriteLine(line));
            Console.WriteLine(report);
            if (s.Report != null) DiffBIR.Lab.AtomicFile.WriteAllText(s.Report, report);
            return 0;
        }
        var options = (s.Steps is int n ? TinyRecipeOptions.Short(n) : new TinyRecipeOptions()) with { Seed = s.Seed, Threads = s.Threads };
        AnsiConsole.WriteLine($"training the tiny DiffBIR into {output} (seed {s.Seed}, {s.Threads} threads{(s.Steps is int k ? $", smoke run: {k} steps per stage" : "")})");
        var result = TinyRecipe.Train(output, options, line => AnsiConsole.WriteLine(line), ct);
        foreach (var (file, sha) in result.Sha256) AnsiConsole.WriteLine($"{sha}  {file}");
        AnsiConsole.WriteLine($"recipe: {result.RecipePath}");
        return 0;
    }
}
