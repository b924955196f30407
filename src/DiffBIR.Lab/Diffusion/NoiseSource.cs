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
/// One seeded stream per batch element: draw k of element i comes from element i's own generator, so a batch
/// [x₁; x₂] gets exactly the noise that x₁ and x₂ get when run alone with <see cref="SeededNoise"/> of their seeds —
/// batched runs then equal one-at-a-time runs up to the networks' own batch arithmetic.
/// </summary>
public sealed class BatchNoise : INoiseSource, IDisposable
{
    readonly Generator[] _gens;
    public IReadOnlyList<long> Seeds { get; }

    public BatchNoise(IReadOnlyList<long> seeds)
    {
        if (seeds.Count == 0) throw new ArgumentException("BatchNoise needs at least one seed");
        Seeds = seeds.ToArray();
        _gens = seeds.Select(s => new Generator((ulong)s, torch.CPU)).ToArray();
    }

    public Tensor Next(Tensor like)
    {
        if (like.shape[0] != _gens.Length)
            throw new ArgumentException($"BatchNoise has {_gens.Length} seeds, but a draw of batch {like.shape[0]} was asked for");
        var one = like.shape.Skip(1).Prepend(1L).ToArray();
        using var scope = torch.NewDisposeScope();
        var parts = _gens.Select(g => torch.randn(one, ScalarType.Float32, torch.CPU, generator: g)).ToArray();
        return torch.cat(parts, 0).to(like.dtype).to(like.device).MoveToOuterDisposeScope();
    }

    public void Dispose() { foreach (var g in _gens) g.Dispose(); }
}
