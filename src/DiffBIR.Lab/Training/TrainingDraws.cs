using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Training;

/// <summary>
/// Every random draw of a training step, in the order the official code makes it (<c>Tensor.bernoulli_</c> for the
/// DropPath keep masks, <c>torch.randn</c> / <c>randn_like</c> for the posterior and diffusion noise,
/// <c>torch.randint</c> for the timesteps). A seeded source is used for real training; a replay source feeds the
/// draws a fixture recorded so that one step can be compared with the official one bit for bit.
/// </summary>
public interface ITrainingDraws
{
    /// <summary>Bernoulli(p) samples (0 or 1) of <paramref name="shape"/> (official <c>x.new_empty(shape).bernoulli_(p)</c>).</summary>
    Tensor Bernoulli(long[] shape, double p, ScalarType dtype, Device device, string what);

    /// <summary>Standard normal samples of <paramref name="shape"/> (<c>torch.randn</c>, <c>randn_like</c>).</summary>
    Tensor Randn(long[] shape, ScalarType dtype, Device device, string what);

    /// <summary>Integers in [0, <paramref name="high"/>) of <paramref name="shape"/>, int64 (<c>torch.randint(0, high, shape)</c>).</summary>
    Tensor RandInt(long high, long[] shape, Device device, string what);

    /// <summary>U[0, 1) samples of <paramref name="shape"/> (<c>torch.rand</c>).</summary>
    Tensor Rand(long[] shape, ScalarType dtype, Device device, string what);

    /// <summary>U[low, high) samples (<c>x.new_zeros(shape).uniform_(low, high)</c>).</summary>
    Tensor Uniform(long[] shape, double low, double high, ScalarType dtype, Device device, string what);

    /// <summary>Poisson samples with the given rates (<c>torch.poisson(rates)</c>), same shape and dtype.</summary>
    Tensor Poisson(Tensor rates, string what);
}

/// <summary>
/// Draws from one seeded CPU <c>torch.Generator</c> (moved to the requested device afterwards), so the same seed
/// gives the same training run on every device. It does not reproduce the official run's global-RNG stream.
/// </summary>
public sealed class SeededTrainingDraws : ITrainingDraws, IDisposable
{
    readonly Generator _gen;
    public long Seed { get; }

    public SeededTrainingDraws(long seed)
    {
        Seed = seed;
        _gen = new Generator((ulong)seed, CPU);
    }

    public Tensor Bernoulli(long[] shape, double p, ScalarType dtype, Device device, string what)
    {
        using var e = empty(shape, dtype, CPU);
        using var m = e.bernoulli_(p, _gen);
        return m.to(device);
    }

    public Tensor Randn(long[] shape, ScalarType dtype, Device device, string what)
    {
        using var n = randn(shape, ScalarType.Float32, CPU, generator: _gen);
        return n.to(dtype).to(device);
    }

    public Tensor RandInt(long high, long[] shape, Device device, string what)
    {
        using var t = randint(0, high, shape, ScalarType.Int64, CPU, generator: _gen);
        return t.to(device);
    }

    public Tensor Rand(long[] shape, ScalarType dtype, Device device, string what)
    {
        using var t = rand(shape, dtype, CPU, generator: _gen);
        return t.to(device);
    }

    public Tensor Uniform(long[] shape, double low, double high, ScalarType dtype, Device device, string what)
    {
        using var z = zeros(shape, dtype, CPU);
        using var u = z.uniform_(low, high, _gen);
        return u.to(device);
    }

    public Tensor Poisson(Tensor rates, string what)
    {
        using var r = rates.cpu();
        using var p = poisson(r, _gen);
        return p.to(rates.device);
    }

    public void Dispose() => _gen.Dispose();
}
