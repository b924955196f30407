using DiffBIR.Lab.Diffusion;
using DiffBIR.Lab.Guidance;
using DiffBIR.Lab.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Stages;

/// <summary>
/// Where a sampling run stands between two steps: the noisy latent z_t and the step it is about to take.
/// States are linear: <see cref="SampleStep.Step"/> consumes a state and returns the next one; using an older state
/// again is refused (the sampler's history, e.g. the previous x̂₀ of a multistep solver, has moved on).
/// All states of one run share it; dispose any of them (usually the last) to free the run's buffers. The final
/// latent (<see cref="Latent"/> once <see cref="IsDone"/>) belongs to the caller and survives that.
/// </summary>
public sealed class SamplingState : IDisposable
{
    internal SamplerRun Run { get; }
    readonly int _evaluations;

    internal SamplingState(SamplerRun run) { Run = run; _evaluations = run.Evaluations; }

    /// <summary>A state at the current position of an existing run (for drivers that started the run themselves).</summary>
    public static SamplingState Of(SamplerRun run) => new(run);

    public Sampler Sampler => Run.Sampler;
    /// <summary>Number of sampler steps of the run.</summary>
    public int Steps => Run.Steps;
    public bool IsDone => Run.IsDone;
    /// <summary>Step index (0 = noisiest) about to be taken; <see cref="Steps"/> when done.</summary>
    public int Step => IsDone ? Run.Steps : Current.Step;
    /// <summary>Model timestep t (999 … 0) of the step about to be taken; −1 when done.</summary>
    public int Timestep => IsDone ? -1 : Current.Timestep;
    /// <summary>z_t before the step (owned by the run, valid until the next step); the sampled latent z₀ when done.</summary>
    public Tensor Latent => IsDone ? Run.Result! : Current.State;

    internal ModelRequest Current
    {
        get
        {
            if (Run.Evaluations != _evaluations)
                throw new InvalidOperationException(
                    $"this sampling state is stale: it was taken after {_evaluations} model evaluations but the run has made {Run.Evaluations}; use the state returned by the last SampleStep.Step");
            return Run.Request ?? throw new InvalidOperationException("the run is finished: no step left to take");
        }
    }

    /// <summary>z after each step so far (official callback order), when the run was started with recordSteps.</summary>
    public IReadOnlyList<Tensor> Records => Run.Records;

    public void Dispose() => Run.Dispose();
}

/// <summary>
/// What the network predicts at a state (one classifier-free-guided evaluation): the combined model output
/// (ε, v or the EDM denoised D, per the sampler's <see cref="ModelRequest.ToMixingSpace"/>) and the predicted clean latent
/// x̂₀ = (z_t − √(1−ᾱ_t) ε)/√ᾱ_t (or the sampler's equivalent), which guidance may replace.
/// Tensors are created in the caller's dispose scope, except <see cref="Latent"/>, which belongs to the run.
/// </summary>
public sealed class Prediction
{
    internal Prediction(ModelRequest request, Tensor output, Tensor x0) { Request = request; Output = output; PredictedX0 = x0; }

    internal ModelRequest Request { get; }
    public int Step => Request.Step;
    /// <summary>Model timestep t (999 … 0).</summary>
    public int Timestep => Request.Timestep;
    /// <summary>z_t, the state the prediction was made from.</summary>
    public Tensor Latent => Request.State;
    /// <summary>The combined (CFG) model output: ε̃ = ε(z_t, c⁻) + s·(ε(z_t, c⁺) − ε(z_t, c⁻)).</summary>
    public Tensor Output { get; }
    /// <summary>x̂₀ predicted from <see cref="Output"/>.</summary>
    public Tensor PredictedX0 { get; }
    /// <summary>∂z_next/∂x̂₀ of the step (spaced: posterior_mean_coef1); guidance divides its gradient by it.</summary>
    public double X0Coefficient => Request.X0Coefficient;
    /// <summary>The classifier-free-guidance scale used for this evaluation.</summary>
    public double CfgScale => Request.CfgScale;
}

/// <summary>
/// The sample-step stage: one sampler step, state → state, for every sampler (<see cref="Samplers.Create"/>).
/// <see cref="Predict"/> runs the network on z_t (classifier-free guidance included) and <see cref="Step"/> applies the
/// sampler's update rule with that prediction — or with a guided x̂₀ in its place — and returns the next state.
/// Samplers that evaluate the network more than once per step (Heun, DPM-2, DPM++ 2S / SDE) make their extra
/// evaluations inside <see cref="Step"/>; guidance and observers see the first one, as in the official code.
/// <see cref="SamplingLoop.Run"/> is the one loop over these steps (the pipeline's too); a notebook may write its own:
/// <code>
/// let mutable state = stepper.Start(xT, steps, noise)
/// while not state.IsDone do
///     use _ = torch.NewDisposeScope()
///     let p = stepper.Predict state
///     state &lt;- stepper.Step(state, p, (guide.Apply p).X0)
/// </code>
/// </summary>
public sealed class SampleStep
{
    public Sampler Sampler { get; }
    /// <summary>The network with its positive and negative conditions (plain or tiled, <see cref="TiledDenoiser"/>).</summary>
    public CfgDenoiser Model { get; }

    public SampleStep(Sampler sampler, CfgDenoiser model) { Sampler = sampler; Model = model; }

    public SampleStep(Sampler sampler, IDenoiser network, Conditioning positive, Conditioning? negative = null)
        : this(sampler, new CfgDenoiser(network, positive, negative)) { }

    /// <summary>The state at z_T (x_T is copied). <paramref name="recordSteps"/> keeps every step's z (for fixtures).</summary>
    public SamplingState Start(Tensor xT, int steps, INoiseSource noise, bool recordSteps = false) =>
        new(Sampler.Start(xT, steps, noise, recordSteps));

    /// <summary>The network's prediction at <paramref name="state"/> (tensors in the caller's dispose scope).</summary>
    public Prediction Predict(SamplingState state)
    {
        var req = state.Current;
        var output = Model.Predict(req);
        return new Prediction(req, output, req.ToX0(output));
    }

    /// <summary>
    /// The sampler's update from z_t with <paramref name="prediction"/>; with <paramref name="guidedX0"/> the update uses
    /// that x̂₀ instead of the network's (the guide stage). Returns the next state; <paramref name="state"/> is used up.
    /// </summary>
    public SamplingState Step(SamplingState state, Prediction prediction, Tensor? guidedX0 = null)
    {
        var req = state.Current;
        if (!ReferenceEquals(req, prediction.Request))
            throw new ArgumentException("the prediction was not made at this state (call Predict on the same state first)", nameof(prediction));
        // A guide that left x̂₀ alone hands back the prediction's own tensor: pass the model output unchanged then, so
        // that samplers which step with ε (not x̂₀) see no ε → x̂₀ → ε round trip.
        if (ReferenceEquals(guidedX0, prediction.PredictedX0)) guidedX0 = null;
        state.Run.Step(prediction.Output, guidedX0);
        // The solver's further evaluations of the same step (Heun's corrector, …): answered with the plain network.
        while (!state.Run.IsDone && !state.Run.Request!.IsFirstOfStep)
        {
            using var scope = torch.NewDisposeScope();
            state.Run.Step(Model.Predict(state.Run.Request!));
        }
        return new SamplingState(state.Run);
    }

    /// <summary>What the observer sees for one step.</summary>
    public static StepInfo StepInfoOf(Prediction p, GuideResult? g, Func<Tensor, Tensor>? decoder = null) =>
        new(p.Step, p.Timestep, p.Latent, g is { Applied: true } ? g.X0 : p.PredictedX0, g?.Applied ?? false, g?.Loss, g?.GradientNorm)
        {
            Output = p.Output, ModelX0 = p.PredictedX0, Decoder = decoder, GuidanceScale = g is { Applied: true } ? g.Scale : null,
        };
}

/// <summary>The guide stage on a <see cref="Prediction"/>.</summary>
public static class GuideExtensions
{
    /// <summary>
    /// Restoration guidance of the prediction's x̂₀ toward the guide's target at the prediction's timestep, with the
    /// sampler's x̂₀ coefficient (official grad_rescale). Outside the guidance window x̂₀ is returned unchanged.
    /// </summary>
    public static GuideResult Apply(this Guide guide, Prediction prediction) =>
        guide.Apply(prediction.PredictedX0, prediction.Timestep, prediction.X0Coefficient);
}
