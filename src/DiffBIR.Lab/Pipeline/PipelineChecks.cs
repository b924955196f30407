namespace DiffBIR.Lab.Pipeline;

/// <summary>An option of a run is out of range; the message names the option (as the CLI spells it) and the cause.</summary>
public sealed class OptionException : ArgumentException
{
    public string Option { get; }
    public OptionException(string option, string cause) : base($"{option}: {cause}") => Option = option;
}

/// <summary>
/// A size that a run would make (condition image, latent, output) is over the limit; thrown before any of it is
/// allocated. The message gives the size that would be made and the options that change it.
/// </summary>
public sealed class SizeLimitException : ArgumentException
{
    public SizeLimitException(string message) : base(message) { }
}

/// <summary>The sizes one restoration makes, derived from the input size before anything is allocated.</summary>
/// <param name="Output">the final image (input × upscale).</param>
/// <param name="Condition">the stage-1 output (at least the condition short edge on both sides), before padding.</param>
/// <param name="Latent">the padded latent the sampler works on (condition / 8, padded).</param>
public sealed record SizePlan((long H, long W) Output, (long H, long W) Condition, (long H, long W) Latent);

/// <summary>Checks made before a run allocates anything: option ranges and every derived size.</summary>
public static class PipelineChecks
{
    /// <summary>Largest image the pipeline makes (condition or output), in megapixels. The file limit is the same
    /// (<see cref="IO.ImageLoadOptions.MaxMegapixels"/>).</summary>
    public const double DefaultMaxMegapixels = 100;

    /// <summary>Official seeds are numpy seeds: 0 … 2³² − 1.</summary>
    public const long MaxSeed = uint.MaxValue;

    static void Finite(double x, string option)
    {
        if (!double.IsFinite(x)) throw new OptionException(option, $"must be a finite number (got {x})");
    }

    /// <summary>
    /// Refuses options that cannot run or would silently do something else: non-finite numbers, steps outside
    /// 1..1000, a guidance window that is empty (t counts down: start must be above stop), tile sizes that are not
    /// multiples of what the networks need, strides outside 1..tile size, seeds outside the official range. Names
    /// are the CLI's.
    /// </summary>
    public static void Validate(PipelineOptions o)
    {
        if (o.Steps < 1 || o.Steps > 1000) throw new OptionException("--steps", $"must be in 1..1000 (got {o.Steps})");
        Finite(o.CfgScale, "--cfg");
        Finite(o.Strength, "--strength");
        Finite(o.SChurn, "--s-churn"); Finite(o.STmin, "--s-tmin"); Finite(o.STmax, "--s-tmax");
        Finite(o.SNoise, "--s-noise"); Finite(o.Eta, "--eta");
        if (o.Order < 1 || o.Order > 4) throw new OptionException("--order", $"must be in 1..4 (got {o.Order})");
        if (o.NoiseAug < 0 || o.NoiseAug > 999) throw new OptionException("--noise-aug", $"must be a timestep in 0..999 (got {o.NoiseAug})");
        if (o.Seed < 0 || o.Seed > MaxSeed) throw new OptionException("--seed", $"must be in 0..{MaxSeed} (the official range) (got {o.Seed})");
        if (!Sampling.Samplers.Names.Contains(o.Sampler))
            throw new OptionException("--sampler", $"unknown sampler '{o.Sampler}' (one of {string.Join(", ", Sampling.Samplers.Names)})");
        // tile options are checked where their tiling is on (they mean nothing otherwise)
        if (o.CleanerTiled) Tile("--cleaner-tile-size", o.CleanerTileSize, "--cleaner-tile-stride", o.CleanerTileStride, 8);
        if (o.VaeEncoderTiled) Tile("--vae-encoder-tile-size", o.VaeEncoderTileSize, null, 0, 8);
        if (o.VaeDecoderTiled) Tile("--vae-decoder-tile-size", o.VaeDecoderTileSize, null, 0, 8);
        if (o.VaeTiling == VaeTiling.GaussianBlend && (o.VaeEncoderTiled || o.VaeDecoderTiled))
        {
            // v2.0.0's blended VAE tiles: the stride counts in latent pixels too
            if (o.VaeEncoderTiled) Tile("--vae-encoder-tile-size", o.VaeEncoderTileSize, "--vae-tile-stride", o.VaeTileStride, 8);
            if (o.VaeDecoderTiled) Tile("--vae-decoder-tile-size", o.VaeDecoderTileSize, "--vae-tile-stride", o.VaeTileStride, 8);
            if (o.VaeTileStride % 8 != 0) throw new OptionException("--vae-tile-stride", $"{o.VaeTileStride} px must be a multiple of 8 px (one latent pixel)");
        }
        if (o.PadMultiple is { } pad && (pad < 8 || pad % 8 != 0))
            throw new OptionException("--pad-multiple", $"{pad} px must be a positive multiple of 8 px (the VAE's downsampling)");
        if (o.CldmTiled) Tile("--cldm-tile-size", o.CldmTileSize, "--cldm-tile-stride", o.CldmTileStride, 64);
        if (o.CldmTiled && o.CldmTileStride % 8 != 0)
            throw new OptionException("--cldm-tile-stride", $"{o.CldmTileStride} px must be a multiple of 8 px (one latent pixel)");
        if (o.Guidance is { } g)
        {
            Finite(g.Scale, "--g-scale");
            if (g.Repeat < 1) throw new OptionException("--g-repeat", $"must be ≥ 1 (got {g.Repeat})");
            if (g.TStart <= g.TStop + 1)
                throw new OptionException("--g-start", $"{g.TStart} with --g-stop {g.TStop} is an empty window: t counts down from 999 to 0 and guidance acts while g-stop < t+1 < g-start, so g-start must be above g-stop + 1");
            if (g is Guidance.WeightedMseGuidance w && w.PatchSize < 1)
                throw new OptionException("--g-patch", $"must be ≥ 1 pixel (got {w.PatchSize})");
        }
    }

    static void Tile(string sizeName, int size, string? strideName, int stride, int multiple)
    {
        if (size < multiple || size % multiple != 0)
            throw new OptionException(sizeName, $"{size} px must be a positive multiple of {multiple} px");
        if (strideName != null && (stride < 1 || stride > size))
            throw new OptionException(strideName, $"{stride} px must be in 1..{size} px (the tile size) so that tiles overlap or touch");
    }

    /// <summary>The sizes a restoration of an h × w input makes with this cleaner (upscale, condition short edge).</summary>
    public static SizePlan Plan(Cleaner cleaner, long h, long w)
    {
        var (oh, ow) = cleaner.OutputSize(h, w);
        return Plan(oh, ow, cleaner.ConditionShortEdge);
    }

    /// <summary>The sizes made for a final output of oh × ow: the condition image has at least
    /// <paramref name="shortEdge"/> on its short side (ImageOps.ResizeShortEdgeTo), the latent is padded.</summary>
    public static SizePlan Plan(double oh, double ow, int shortEdge)
    {
        double ch = oh, cw = ow;
        if (Math.Min(ch, cw) < shortEdge && Math.Min(ch, cw) >= 1)
        {
            double s = (double)shortEdge / Math.Min(ch, cw);
            (ch, cw) = ch == cw ? ((double)shortEdge, (double)shortEdge) : ch < cw ? ((double)shortEdge, Math.Floor(cw * s)) : (Math.Floor(ch * s), (double)shortEdge);
        }
        static long L(double x) => x >= 1e15 ? (long)1e15 : (long)x;
        static long Pad(long x, long m) => (x + m - 1) / m * m;
        long lh = L(ch), lw = L(cw);
        return new SizePlan((L(oh), L(ow)), (lh, lw), (Pad(Pad(lh, 64) / 8, 8), Pad(Pad(lw, 64) / 8, 8)));
    }

    /// <summary>Largest condition image, in megapixels, that stage 2 processes without tiling (a 4096² image; an
    /// untiled VAE encoder or UNet at that size already needs far more memory than any one GPU has).</summary>
    public const double DefaultMaxUntiledMegapixels = 16.8;

    /// <summary>
    /// Refuses (with <see cref="SizeLimitException"/>) a plan whose output would be over
    /// <paramref name="maxMegapixels"/> or empty, or whose condition image would be over the same limit, or over
    /// <see cref="DefaultMaxUntiledMegapixels"/> unless the VAE and the diffusion are tiled.
    /// <paramref name="what"/> names the input (file) in the message, <paramref name="h"/> × <paramref name="w"/> is its size.
    /// </summary>
    public static SizePlan CheckSizes(SizePlan p, long h, long w, string what, PipelineOptions? o = null, double maxMegapixels = DefaultMaxMegapixels)
    {
        const string tiling = "--vae-encoder-tiled --vae-decoder-tiled --cldm-tiled";
        if (p.Output.H < 1 || p.Output.W < 1)
            throw new SizeLimitException($"{what}: {w}×{h} px would give an empty {p.Output.W}×{p.Output.H} px output; raise --upscale");
        bool tiled = o is { VaeEncoderTiled: true, VaeDecoderTiled: true, CldmTiled: true };
        double outMp = (double)p.Output.H * p.Output.W / 1e6, condMp = (double)p.Condition.H * p.Condition.W / 1e6;
        if (outMp > maxMegapixels)
            throw new SizeLimitException($"{what}: {w}×{h} px would make a {p.Output.W}×{p.Output.H} px output ({outMp:F1} MP), over the {maxMegapixels} MP limit; lower --upscale or split the image");
        string stretched = Math.Min(p.Condition.H, p.Condition.W) > Math.Min(p.Output.H, p.Output.W)
            ? $" (its short side is raised to {Math.Min(p.Condition.H, p.Condition.W)} px, the model's minimum)" : "";
        if (condMp > maxMegapixels)
            throw new SizeLimitException($"{what}: {w}×{h} px would make a {p.Condition.W}×{p.Condition.H} px condition image{stretched} ({condMp:F1} MP), over the {maxMegapixels} MP limit even with tiling; lower --upscale or split the image");
        if (!tiled && condMp > DefaultMaxUntiledMegapixels)
            throw new SizeLimitException($"{what}: {w}×{h} px would make a {p.Condition.W}×{p.Condition.H} px condition image{stretched} ({condMp:F1} MP), over the {DefaultMaxUntiledMegapixels} MP that stage 2 processes untiled; use {tiling} or lower --upscale");
        return p;
    }

    /// <summary><see cref="CheckSizes(SizePlan, long, long, string, PipelineOptions?, double)"/> for an input given to a cleaner.</summary>
    public static SizePlan CheckSizes(Cleaner cleaner, long h, long w, string what, PipelineOptions? o = null, double maxMegapixels = DefaultMaxMegapixels) =>
        CheckSizes(Plan(cleaner, h, w), h, w, what, o, maxMegapixels);
}
