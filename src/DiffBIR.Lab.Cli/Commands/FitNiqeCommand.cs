using System.ComponentModel;
using DiffBIR.Lab.IO;
using DiffBIR.Lab.Metrics;
using DiffBIR.Lab.Metrics.Niqe;
using Spectre.Console;
using Spectre.Console.Cli;

namespace DiffBIR.Lab.Cli.Commands;

public sealed class FitNiqeSettings : CommandSettings
{
    [CommandOption("--hq <DIR>")]
    [Description("Folder of pristine (HQ) images to fit the model on.")]
    public string? Hq { get; set; }

    [CommandOption("--procedural <N>")]
    [Description("Fit on images 0 … N−1 of the project's procedural HQ family instead (seed --seed, --size px): how the committed model is made.")]
    public int? Procedural { get; set; }

    [CommandOption("--seed <S>")]
    [Description("Seed of the procedural family (default 2026, the tiny recipe's).")]
    public long Seed { get; set; } = 2026;

    [CommandOption("--size <PX>")]
    [Description("Side of the procedural images (default 128).")]
    public int Size { get; set; } = 128;

    [CommandOption("-o|--output <FILE>")]
    [Description("The model file to write (default weights/niqe_lab.safetensors).")]
    public string Output { get; set; } = Path.Combine("weights", NiqeLab.ModelFile);

    [CommandOption("--block <PX>")]
    [Description("Block size in pixels (even, ≥ 8; default 32). Images smaller than one block are refused.")]
    public int Block { get; set; } = NiqeLab.BlockSize;
}

/// <summary>
/// <c>diffbir-lab weights fit-niqe</c>: fits the pristine model of NIQE (MATLAB estimatemodelparam) on a folder of HQ
/// images and writes it atomically. Exit 0 done, 2 bad input (the folder, an image or the block size).
/// </summary>
public sealed class FitNiqeCommand : Command<FitNiqeSettings>
{
    public override int Execute(CommandContext context, FitNiqeSettings s, CancellationToken ct)
    {
        if (s.Block < 8 || s.Block % 2 != 0) throw new ArgumentException($"--block: must be an even number ≥ 8 (got {s.Block})");
        var outDir = Path.GetDirectoryName(Path.GetFullPath(s.Output))!;
        if (!Directory.Exists(outDir)) throw new ArgumentException($"-o: the folder {outDir} does not exist");
        if (Directory.Exists(s.Output)) throw new ArgumentException($"-o: {s.Output} is a folder; give the model file to write");
        if (s.Procedural is { } n)
        {
            if (s.Hq is not null) throw new ArgumentException("--procedural: give either --hq or --procedural, not both");
            if (n < 1 || n > 100_000) throw new ArgumentException($"--procedural: must be 1 … 100000 images (got {n})");
            if (s.Size < s.Block || s.Size > 1024) throw new ArgumentException($"--size: must be {s.Block} … 1024 px (got {s.Size})");
            var greysP = Enumerable.Range(0, n).Select(i =>
            {
                ct.ThrowIfCancellationRequested();
                using var img = DiffBIR.Lab.Data.ProceduralImages.Generate(s.Seed, i, s.Size);
                using var u8 = DiffBIR.Lab.IO.ImageIO.ToUInt8(img, Quantization.Round);
                using var back = DiffBIR.Lab.IO.ImageIO.FromUInt8(u8);
                return Niqe.GreyLevels(back[0]);
            });
            var modelP = Niqe.Fit(greysP, s.Block, $"procedural HQ family: seed {s.Seed}, images 0…{n - 1}, {s.Size} px (diffbir-lab weights fit-niqe --procedural {n} --seed {s.Seed} --size {s.Size} --block {s.Block})");
            return Write(modelP, s);
        }
        if (s.Hq is null) throw new ArgumentException("--hq: give the folder of pristine images to fit on (or --procedural N)");
        if (!Directory.Exists(s.Hq)) throw new ArgumentException($"--hq: {s.Hq} is not a folder");
        var files = Directory.EnumerateFiles(s.Hq)
            .Where(f => MetricsTable.ImageExtensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
            .OrderBy(f => f, StringComparer.Ordinal).ToList();
        if (files.Count == 0) throw new ArgumentException($"--hq: {s.Hq} holds no images ({string.Join(", ", MetricsTable.ImageExtensions)})");
        var greys = new List<double[,]>();
        foreach (var f in files)
        {
            ct.ThrowIfCancellationRequested();
            using var img = ImageIO.Load(f);
            if (img.Image.shape[2] < s.Block || img.Image.shape[3] < s.Block)
                throw new ArgumentException($"{f}: the image is {img.Image.shape[3]}×{img.Image.shape[2]}, smaller than one {s.Block}-px block");
            greys.Add(Niqe.GreyLevels(img.Image[0]));
        }
        var model = Niqe.Fit(greys, s.Block, $"{files.Count} images of {Path.GetFullPath(s.Hq)}");
        return Write(model, s);
    }

    static int Write(NiqeModel model, FitNiqeSettings s)
    {
        model.Save(s.Output); // SafeTensors.Save writes atomically
        AnsiConsole.WriteLine($"NIQE model: {model.Blocks} sharp blocks of {model.Images} images, block {model.BlockSize} px → {s.Output}");
        return 0;
    }
}
