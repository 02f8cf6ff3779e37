// etcdload: bench's load generator for etcd, on etcd's own Go client (clientv3, gRPC).
//
// bench (bench/etcd_go.py) builds it in GOPATH mode from Debian's packages
// (golang-go, golang-etcd-server-dev) and runs one process per phase. It does
// what bench's Python driver does for kvsvr, with the same workload mixes, key
// distributions and latency histogram layout, so the two sides are measured
// alike and etcd is driven at its best:
//
//   - closed loop: -clients clients, each issuing its next operation as soon as
//     the previous one answered;
//   - open loop: operations scheduled at a constant total -rate, taken in order
//     by a pool of -clients workers; latency from the *scheduled* start, and
//     operations unfinished -drain-s after the window counted as unfinished at
//     the time they had waited;
//   - load: keys 0..-keys-1 written once (-load-batch puts per txn).
//
// Clients share -conns clientv3 connections, connection i pinned to endpoint
// i mod len(endpoints) (as etcd's own benchmark tool does).
//
// Protocol (stdout, one JSON object a line): {"event":"ready"} once every
// connection has answered a read; then the driver reads one line from stdin,
// the run's start as Unix seconds; {"event":"progress","completed":N} every
// 250 ms; {"event":"result","result":{...}} at the end, or
// {"event":"error","message":"..."} and exit status 1. The result holds
// latency histograms by operation ("read", "update", "cas", "unfinished") in
// bench.driver.Histogram's layout, the counts, and the driver's own CPU
// seconds over the measured window (getrusage).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/bits"
	"math/rand"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
	"google.golang.org/grpc/status"
)

const (
	subBits         = 7 // bench.driver.Histogram.SUB_BITS
	subCount        = 1 << subBits
	zipfianTheta    = 0.99
	valuePoolSize   = 64
	errorSamplesMax = 5
	progressEvery   = 250 * time.Millisecond
	loadAttempts    = 3
)

// --- the histogram (bench.driver.Histogram, in Go) -------------------------------------

type histogram struct {
	counts map[int64]int64
	total  int64
	sumUs  int64
	minUs  int64
	maxUs  int64
}

func newHistogram() *histogram { return &histogram{counts: map[int64]int64{}} }

func bucketOf(valueUs int64) int64 {
	if valueUs < 2*subCount {
		return valueUs
	}
	shift := int64(bits.Len64(uint64(valueUs))) - (subBits + 1)
	return shift*subCount + (valueUs >> uint(shift))
}

func (h *histogram) record(d time.Duration) {
	us := int64(math.Round(float64(d.Nanoseconds()) / 1000))
	if us < 0 {
		us = 0
	}
	h.counts[bucketOf(us)]++
	if h.total == 0 || us < h.minUs {
		h.minUs = us
	}
	if us > h.maxUs {
		h.maxUs = us
	}
	h.total++
	h.sumUs += us
}

func (h *histogram) merge(o *histogram) {
	if o.total == 0 {
		return
	}
	for b, c := range o.counts {
		h.counts[b] += c
	}
	if h.total == 0 || o.minUs < h.minUs {
		h.minUs = o.minUs
	}
	if o.maxUs > h.maxUs {
		h.maxUs = o.maxUs
	}
	h.total += o.total
	h.sumUs += o.sumUs
}

func (h *histogram) toJSON() map[string]interface{} {
	counts := map[string]int64{}
	for b, c := range h.counts {
		counts[strconv.FormatInt(b, 10)] = c
	}
	return map[string]interface{}{
		"counts": counts, "total": h.total, "sum_us": h.sumUs, "min_us": h.minUs, "max_us": h.maxUs,
	}
}

// --- keys (bench.workloads, in Go) -------------------------------------------------------

func keyName(index int64) string { return fmt.Sprintf("user%010d", index) }

func fnv1a64(number uint64) uint64 {
	hashed := uint64(0xCBF29CE484222325)
	for i := 0; i < 8; i++ {
		hashed ^= number & 0xFF
		hashed *= 0x100000001B3
		number >>= 8
	}
	return hashed
}

func zeta(count int64, theta float64) float64 {
	sum := 0.0
	for i := int64(1); i <= count; i++ {
		sum += 1.0 / math.Pow(float64(i), theta)
	}
	return sum
}

// zipfianLaw holds what every chooser of one key count shares.
type zipfianLaw struct {
	count                       int64
	zetaN, alpha, eta, halfPowT float64
}

func newZipfianLaw(count int64) *zipfianLaw {
	zetaN := zeta(count, zipfianTheta)
	return &zipfianLaw{
		count:    count,
		zetaN:    zetaN,
		alpha:    1.0 / (1.0 - zipfianTheta),
		eta:      (1 - math.Pow(2.0/float64(count), 1-zipfianTheta)) / (1 - zeta(2, zipfianTheta)/zetaN),
		halfPowT: 1 + math.Pow(0.5, zipfianTheta),
	}
}

type keyChooser struct {
	rng     *rand.Rand
	count   int64
	zipfian *zipfianLaw // nil: uniform
}

func (k *keyChooser) next() int64 {
	if k.zipfian == nil {
		return k.rng.Int63n(k.count)
	}
	z := k.zipfian
	u := k.rng.Float64()
	uz := u * z.zetaN
	var rank int64
	switch {
	case uz < 1.0:
		rank = 0
	case uz < z.halfPowT:
		rank = 1
		if k.count < 2 {
			rank = 0
		}
	default:
		rank = int64(float64(k.count) * math.Pow(z.eta*u-z.eta+1, z.alpha))
		if rank > k.count-1 {
			rank = k.count - 1
		}
	}
	return int64(fnv1a64(uint64(rank)) % uint64(k.count))
}

// --- options --------------------------------------------------------------------------------

type options struct {
	endpoints                  []string
	mode                       string
	read, update, cas          float64
	serializable               bool
	clients, conns             int
	distribution               string
	keys                       int64
	valueBytes                 int
	rate                       float64
	warmup, duration           time.Duration
	opTimeout, drain, errPause time.Duration
	seed                       int64
	loadBatch                  int
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func parseOptions() (*options, error) {
	o := &options{}
	endpoints := flag.String("endpoints", "", "comma-separated host:port of the members")
	flag.StringVar(&o.mode, "mode", "closed", "closed, open or load")
	flag.Float64Var(&o.read, "read", 0, "fraction of reads")
	flag.Float64Var(&o.update, "update", 0, "fraction of puts")
	flag.Float64Var(&o.cas, "cas", 0, "fraction of read-then-compare-and-set (txn on mod_revision)")
	flag.BoolVar(&o.serializable, "serializable", false, "serializable reads (default: linearizable)")
	flag.IntVar(&o.clients, "clients", 64, "closed: concurrent clients; open: workers; load: writers")
	flag.IntVar(&o.conns, "conns", 8, "gRPC connections the clients share")
	flag.StringVar(&o.distribution, "distribution", "zipfian", "zipfian or uniform")
	flag.Int64Var(&o.keys, "keys", 100000, "keys loaded")
	flag.IntVar(&o.valueBytes, "value-bytes", 100, "value size")
	flag.Float64Var(&o.rate, "rate", 0, "open loop: offered operations per second")
	warmup := flag.Float64("warmup-s", 3, "warm-up seconds")
	duration := flag.Float64("duration-s", 30, "measured seconds")
	opTimeout := flag.Float64("op-timeout-s", 10, "time an operation may take before it is an error")
	drain := flag.Float64("drain-s", 2, "open loop: time after the window for scheduled operations")
	errPause := flag.Float64("error-pause-s", 0.01, "closed loop: pause after an error")
	flag.Int64Var(&o.seed, "seed", 1, "seed")
	flag.IntVar(&o.loadBatch, "load-batch", 1, "load: puts per txn")
	flag.Parse()
	o.warmup, o.duration = seconds(*warmup), seconds(*duration)
	o.opTimeout, o.drain, o.errPause = seconds(*opTimeout), seconds(*drain), seconds(*errPause)
	for _, e := range strings.Split(*endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			o.endpoints = append(o.endpoints, e)
		}
	}
	switch {
	case len(o.endpoints) == 0:
		return nil, errors.New("-endpoints: name at least one member")
	case o.mode != "closed" && o.mode != "open" && o.mode != "load":
		return nil, fmt.Errorf("-mode must be closed, open or load, not %q", o.mode)
	case o.mode != "load" && math.Abs(o.read+o.update+o.cas-1) > 1e-9:
		return nil, errors.New("-read, -update and -cas must sum to 1")
	case o.mode == "open" && !(o.rate > 0):
		return nil, errors.New("an open-loop run needs -rate > 0")
	case o.clients < 1 || o.conns < 1 || o.keys < 1 || o.loadBatch < 1:
		return nil, errors.New("-clients, -conns, -keys and -load-batch must be >= 1")
	case o.distribution != "zipfian" && o.distribution != "uniform":
		return nil, fmt.Errorf("-distribution must be zipfian or uniform, not %q", o.distribution)
	}
	return o, nil
}

// --- recording --------------------------------------------------------------------------------

// recorder: one per client goroutine (no locks on the hot path), merged at the end.
type recorder struct {
	latency      map[string]*histogram
	service      *histogram
	ok           int64
	conflicts    int64
	unfinished   int64
	errors       map[string]int64
	errorSamples []string
}

func newRecorder() *recorder {
	return &recorder{latency: map[string]*histogram{}, service: newHistogram(), errors: map[string]int64{}, errorSamples: []string{}}
}

func (r *recorder) record(op string, d time.Duration) {
	h := r.latency[op]
	if h == nil {
		h = newHistogram()
		r.latency[op] = h
	}
	h.record(d)
}

func errorName(err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return "DeadlineExceeded"
	}
	if s, ok := status.FromError(err); ok {
		return "grpc." + s.Code().String()
	}
	return fmt.Sprintf("%T", err)
}

func (r *recorder) error(err error) {
	name := errorName(err)
	r.errors[name]++
	if len(r.errorSamples) < errorSamplesMax {
		text := err.Error()
		if len(text) > 300 {
			text = text[:300]
		}
		r.errorSamples = append(r.errorSamples, name+": "+text)
	}
}

func (r *recorder) merge(o *recorder) {
	for op, h := range o.latency {
		if r.latency[op] == nil {
			r.latency[op] = newHistogram()
		}
		r.latency[op].merge(h)
	}
	r.service.merge(o.service)
	r.ok += o.ok
	r.conflicts += o.conflicts
	r.unfinished += o.unfinished
	for name, count := range o.errors {
		r.errors[name] += count
	}
	for _, sample := range o.errorSamples {
		if len(r.errorSamples) < errorSamplesMax {
			r.errorSamples = append(r.errorSamples, sample)
		}
	}
}

// --- operations --------------------------------------------------------------------------------

type worker struct {
	o      *options
	kv     clientv3.KV
	rng    *rand.Rand
	keys   *keyChooser
	values [][]byte
	next   int
}

func valuePool(size int, seed int64) [][]byte {
	rng := rand.New(rand.NewSource(seed))
	pool := make([][]byte, valuePoolSize)
	for i := range pool {
		pool[i] = make([]byte, size)
		rng.Read(pool[i])
	}
	return pool
}

func (w *worker) value() string {
	w.next = (w.next + 1) % len(w.values)
	return string(w.values[w.next])
}

func (w *worker) choose() string {
	draw := w.rng.Float64()
	switch {
	case draw < w.o.read:
		return "read"
	case draw < w.o.read+w.o.update:
		return "update"
	case w.o.cas > 0:
		return "cas"
	}
	return "update"
}

// run runs one operation; false when a cas lost its race (wrote nothing).
func (w *worker) run(ctx context.Context, op string, key string) (bool, error) {
	switch op {
	case "read":
		var err error
		if w.o.serializable {
			_, err = w.kv.Get(ctx, key, clientv3.WithSerializable())
		} else {
			_, err = w.kv.Get(ctx, key)
		}
		return true, err
	case "update":
		_, err := w.kv.Put(ctx, key, w.value())
		return true, err
	}
	// cas: the read of a read-modify-write is linearizable, as kvsvr's is.
	got, err := w.kv.Get(ctx, key)
	if err != nil {
		return false, err
	}
	var revision int64
	if len(got.Kvs) > 0 {
		revision = got.Kvs[0].ModRevision
	}
	txn, err := w.kv.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", revision)).
		Then(clientv3.OpPut(key, w.value())).
		Commit()
	if err != nil {
		return false, err
	}
	return txn.Succeeded, nil
}

// --- the loops ---------------------------------------------------------------------------------

type clock struct {
	runStart, windowStart, windowEnd, drainEnd time.Time
}

func closedLoop(w *worker, r *recorder, c clock, completed *int64) {
	for {
		started := time.Now()
		if !started.Before(c.windowEnd) {
			return
		}
		op := w.choose()
		key := keyName(w.keys.next())
		ctx, cancel := context.WithTimeout(context.Background(), w.o.opTimeout)
		written, err := w.run(ctx, op, key)
		cancel()
		finished := time.Now()
		atomic.AddInt64(completed, 1)
		measured := !finished.Before(c.windowStart) && finished.Before(c.windowEnd)
		if err != nil {
			if measured {
				r.error(err)
			}
			time.Sleep(w.o.errPause)
			continue
		}
		if measured {
			r.ok++
			if !written {
				r.conflicts++
			}
			r.record(op, finished.Sub(started))
		}
	}
}

func openLoop(w *worker, r *recorder, c clock, number *int64, completed *int64) {
	interval := float64(time.Second) / w.o.rate
	for {
		n := atomic.AddInt64(number, 1) - 1
		intended := c.runStart.Add(time.Duration(float64(n) * interval))
		if !intended.Before(c.windowEnd) {
			return
		}
		if wait := time.Until(intended); wait > 0 {
			time.Sleep(wait)
		}
		measured := !intended.Before(c.windowStart)
		issued := time.Now()
		if !issued.Before(c.drainEnd) {
			if measured {
				r.unfinished++
				r.record("unfinished", c.drainEnd.Sub(intended))
			}
			continue
		}
		op := w.choose()
		key := keyName(w.keys.next())
		deadline := issued.Add(w.o.opTimeout)
		if c.drainEnd.Before(deadline) {
			deadline = c.drainEnd
		}
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		written, err := w.run(ctx, op, key)
		cancel()
		finished := time.Now()
		atomic.AddInt64(completed, 1)
		if !measured {
			continue
		}
		switch {
		case err != nil && !finished.Before(c.drainEnd):
			r.unfinished++
			r.record("unfinished", c.drainEnd.Sub(intended))
		case err != nil:
			r.error(err)
		default:
			r.ok++
			if !written {
				r.conflicts++
			}
			r.record(op, finished.Sub(intended))
			r.service.record(finished.Sub(issued))
		}
	}
}

func load(w *worker, r *recorder, next *int64, completed *int64) error {
	for {
		first := atomic.AddInt64(next, int64(w.o.loadBatch)) - int64(w.o.loadBatch)
		if first >= w.o.keys {
			return nil
		}
		last := first + int64(w.o.loadBatch)
		if last > w.o.keys {
			last = w.o.keys
		}
		var err error
		for attempt := 0; attempt < loadAttempts; attempt++ {
			ctx, cancel := context.WithTimeout(context.Background(), w.o.opTimeout)
			if last-first == 1 {
				_, err = w.kv.Put(ctx, keyName(first), string(w.values[first%int64(len(w.values))]))
			} else {
				ops := make([]clientv3.Op, 0, last-first)
				for i := first; i < last; i++ {
					ops = append(ops, clientv3.OpPut(keyName(i), string(w.values[i%int64(len(w.values))])))
				}
				_, err = w.kv.Txn(ctx).Then(ops...).Commit()
			}
			cancel()
			if err == nil {
				break
			}
			r.error(err)
		}
		if err != nil {
			return err
		}
		r.ok += last - first
		atomic.AddInt64(completed, last-first)
	}
}

// --- main ---------------------------------------------------------------------------------------

var stdout = json.NewEncoder(os.Stdout)
var stdoutLock sync.Mutex

func emit(event map[string]interface{}) {
	stdoutLock.Lock()
	defer stdoutLock.Unlock()
	_ = stdout.Encode(event)
}

func fail(format string, args ...interface{}) {
	emit(map[string]interface{}{"event": "error", "message": fmt.Sprintf(format, args...)})
	os.Exit(1)
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

func connect(o *options) []*clientv3.Client {
	conns := make([]*clientv3.Client, o.conns)
	for i := range conns {
		client, err := clientv3.New(clientv3.Config{
			Endpoints:   []string{o.endpoints[i%len(o.endpoints)]},
			DialTimeout: 10 * time.Second,
		})
		if err != nil {
			fail("connecting to %s: %v", o.endpoints[i%len(o.endpoints)], err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = client.Get(ctx, "bench-probe", clientv3.WithSerializable())
		cancel()
		if err != nil {
			fail("first read on %s: %v", o.endpoints[i%len(o.endpoints)], err)
		}
		conns[i] = client
	}
	return conns
}

func main() {
	o, err := parseOptions()
	if err != nil {
		fail("%v", err)
	}
	conns := connect(o)
	var law *zipfianLaw
	if o.distribution == "zipfian" && o.mode != "load" {
		law = newZipfianLaw(o.keys)
	}
	workers := make([]*worker, o.clients)
	recorders := make([]*recorder, o.clients)
	for i := range workers {
		rng := rand.New(rand.NewSource(o.seed*1000003 + int64(i)))
		workers[i] = &worker{
			o: o, kv: conns[i%len(conns)].KV, rng: rng,
			keys:   &keyChooser{rng: rng, count: o.keys, zipfian: law},
			values: valuePool(o.valueBytes, o.seed*7919+int64(i)),
		}
		if o.mode == "load" {
			workers[i].values = valuePool(o.valueBytes, o.seed)
		}
		recorders[i] = newRecorder()
	}
	emit(map[string]interface{}{"event": "ready"})

	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil {
		fail("reading the start time from stdin: %v", err)
	}
	startUnix, err := strconv.ParseFloat(strings.TrimSpace(line), 64)
	if err != nil {
		fail("start time %q: %v", line, err)
	}
	// One wall-clock instant for bench and the driver, on this process's monotonic clock.
	wall := time.Unix(0, int64(startUnix*1e9))
	var c clock
	c.runStart = time.Now().Add(time.Until(wall))
	c.windowStart = c.runStart.Add(o.warmup)
	c.windowEnd = c.windowStart.Add(o.duration)
	c.drainEnd = c.windowEnd.Add(o.drain)
	time.Sleep(time.Until(c.runStart))

	var completed int64
	done := make(chan struct{})
	go func() {
		ticker := time.NewTicker(progressEvery)
		defer ticker.Stop()
		for {
			select {
			case <-done:
				return
			case <-ticker.C:
				emit(map[string]interface{}{"event": "progress", "completed": atomic.LoadInt64(&completed)})
			}
		}
	}()
	cpu := struct{ start, end float64 }{start: cpuSeconds()}
	var cpuLock sync.Mutex
	if o.mode != "load" {
		go func() {
			time.Sleep(time.Until(c.windowStart))
			cpuLock.Lock()
			cpu.start = cpuSeconds()
			cpuLock.Unlock()
			time.Sleep(time.Until(c.windowEnd))
			cpuLock.Lock()
			cpu.end = cpuSeconds()
			cpuLock.Unlock()
		}()
	}

	started := time.Now()
	var wg sync.WaitGroup
	var number int64
	var loadErr error
	var loadErrOnce sync.Once
	for i := range workers {
		wg.Add(1)
		go func(w *worker, r *recorder) {
			defer wg.Done()
			switch o.mode {
			case "closed":
				closedLoop(w, r, c, &completed)
			case "open":
				openLoop(w, r, c, &number, &completed)
			default:
				if err := load(w, r, &number, &completed); err != nil {
					loadErrOnce.Do(func() { loadErr = err })
				}
			}
		}(workers[i], recorders[i])
	}
	wg.Wait()
	elapsed := time.Since(started)
	close(done)
	if loadErr != nil {
		fail("load: %v", loadErr)
	}
	cpuLock.Lock()
	if cpu.end == 0 {
		cpu.end = cpuSeconds()
	}
	cpuS := cpu.end - cpu.start
	cpuLock.Unlock()

	total := newRecorder()
	for _, r := range recorders {
		total.merge(r)
	}
	latency := map[string]interface{}{}
	for op, h := range total.latency {
		latency[op] = h.toJSON()
	}
	emit(map[string]interface{}{
		"event": "result",
		"result": map[string]interface{}{
			"latency":       latency,
			"service":       total.service.toJSON(),
			"ok":            total.ok,
			"conflicts":     total.conflicts,
			"unfinished":    total.unfinished,
			"errors":        total.errors,
			"error_samples": total.errorSamples,
			"completed":     atomic.LoadInt64(&completed),
			"cpu_s":         cpuS,
			"elapsed_s":     elapsed.Seconds(),
			"driver": map[string]interface{}{
				"name": "etcdload", "client": "clientv3 (gRPC)", "go": runtime.Version(),
				"gomaxprocs": runtime.GOMAXPROCS(0), "clients": o.clients, "conns": o.conns,
			},
		},
	})
	for _, client := range conns {
		client.Close()
	}
}
