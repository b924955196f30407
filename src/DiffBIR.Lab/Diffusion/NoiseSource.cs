using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diffusion;

/// <summary>
/// Where a sampler's random normals come from (the official code calls <c>torch.randn_like</c>). Every draw goes
/// through <see cref="Next"/>, in the same order as the official samplers draw, so recorded noise can be replayed.
/// </summary>
public interface INoiseSource
{
    /// <summary>A standard normal tensor with the shape, dtype and device of <paramref name="like"/>.</summary>
    Tensor Next(Tensor like);
}

/// <summary>
/// The default source: a seeded CPU <c>torch.Generator</c>, drawn on the CPU and moved to the tensor's device, so the
/// same seed gives bit-identical draws on every run and device.
/// </summary>
public sealed class SeededNoise : INoiseSource, IDisposable
{
    readonly Generator _gen;
    public long Seed { get; }

    public SeededNoise(long seed)
    {
        Seed = seed;
        _gen = new Generator((ulong)seed, torch.CPU);
    }

    public Tensor Next(Tensor like) =>
        torch.randn(like.shape, ScalarType.Float32, torch.CPU, generator: _gen).to(like.dtype).to(like.device);

    public void Dispose() => _gen.Dispose();
}

/// <summary>
/// Replays recorded draws in order (the fixtures' <c>in.&lt;run&gt;.noise</c>, stacked [K, ...]). Asking for more
/// draws than were recorded, or for a different shape, is an error that names the draw.
/// </summary>
public sealed class ReplayNoise : INoiseSource
{
    readonly Tensor? _draws;
    public int Used { get; private set; }
    public int Count => _draws is null ? 0 : (int)_draws.shape[0];

    public ReplayNoise(Tensor? stacked) => _draws = stacked;

    public Tensor Next(Tensor like)
    {
        if (_draws is null || Used >= _draws.shape[0])
            throw new InvalidOperationException($"noise draw {Used} requested, but only {Count} were recorded");
        var t = _draws[Used];
        if (!t.shape.SequenceEqual(like.shape))
            throw new InvalidOperationException(
                $"noise draw {Used}: recorded shape [{string.Join(",", t.shape)}], sampler asked for [{string.Join(",", like.shape)}]");
        Used++;
        return t.to(like.dtype).to(like.device);
    }
}
