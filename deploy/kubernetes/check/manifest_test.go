// The DaemonSet as the API server would take it: decoded into k8s.io/api's
// apps/v1 DaemonSet as its strict field validation decodes (sigs.k8s.io/json:
// field names case-sensitive, unknown and duplicate fields rejected; a
// misspelt or misplaced key fails here, not at `kubectl apply`), then
// checked with apimachinery's own name and label rules and for what the
// docs/kubernetes.md promises of it. tests/kata_host.rs checks its args against the
// binary; tests/packages.rs runs the image with its security context.
package check

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

const manifest = "../kata-trace-forwarder.yaml"

// decodeStrict: YAML with duplicate keys refused, then JSON decoded the
// API server's way (encoding/json alone would take `hostPid` for hostPID).
func decodeStrict(data []byte) (*appsv1.DaemonSet, error) {
	j, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, err
	}
	var ds appsv1.DaemonSet
	strict, err := kjson.UnmarshalStrict(j, &ds, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return nil, err
	}
	if len(strict) > 0 {
		return nil, errors.Join(strict...)
	}
	return &ds, nil
}

func load(t *testing.T) *appsv1.DaemonSet {
	t.Helper()
	data, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := decodeStrict(data)
	if err != nil {
		t.Fatalf("%s does not decode strictly into an apps/v1 DaemonSet: %v", manifest, err)
	}
	return ds
}

func TestDecodesStrictlyAsAnAppsV1DaemonSet(t *testing.T) {
	ds := load(t)
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" {
		t.Fatalf("apiVersion %q kind %q", ds.APIVersion, ds.Kind)
	}
	// The decoder itself must refuse what the API server would: a field a
	// DaemonSet has not, a field name in the wrong case, a key twice.
	head := "apiVersion: apps/v1\nkind: DaemonSet\n"
	for _, bad := range []string{
		"spec:\n  replicas: 1\n",
		"spec:\n  template:\n    spec:\n      hostPid: true\n",
		"spec:\n  minReadySeconds: 1\n  minReadySeconds: 2\n",
	} {
		if _, err := decodeStrict([]byte(head + bad)); err == nil {
			t.Errorf("strict decoding accepted:\n%s", bad)
		}
	}
}

func errs(t *testing.T, what string, problems []string) {
	t.Helper()
	if len(problems) > 0 {
		t.Errorf("%s: %s", what, strings.Join(problems, "; "))
	}
}

func TestNamesAndLabelsAreValid(t *testing.T) {
	ds := load(t)
	errs(t, "metadata.name "+ds.Name, validation.IsDNS1123Subdomain(ds.Name))
	errs(t, "metadata.namespace "+ds.Namespace, validation.IsDNS1123Label(ds.Namespace))
	spec := ds.Spec.Template.Spec
	for k, v := range spec.NodeSelector {
		errs(t, "nodeSelector key "+k, validation.IsQualifiedName(k))
		errs(t, "nodeSelector value "+v, validation.IsValidLabelValue(v))
	}
	for k, v := range ds.Spec.Template.Labels {
		errs(t, "label key "+k, validation.IsQualifiedName(k))
		errs(t, "label value "+v, validation.IsValidLabelValue(v))
	}
	for _, c := range spec.Containers {
		errs(t, "container "+c.Name, validation.IsDNS1123Label(c.Name))
		for _, e := range c.Env {
			errs(t, "env "+e.Name, validation.IsEnvVarName(e.Name))
		}
	}
	for _, v := range spec.Volumes {
		errs(t, "volume "+v.Name, validation.IsDNS1123Label(v.Name))
	}
}

func TestSelectorMatchesThePodTemplate(t *testing.T) {
	ds := load(t)
	if ds.Spec.Selector == nil {
		t.Fatal("no spec.selector (required for apps/v1)")
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Empty() || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Fatalf("selector %v does not select the template's labels %v", sel, ds.Spec.Template.Labels)
	}
}

// Every mount has its volume, every volume is mounted, every host path is
// absolute with a known type, and no mount needs privilege (Bidirectional).
func TestMountsAndVolumesAgree(t *testing.T) {
	spec := load(t).Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		if _, dup := volumes[v.Name]; dup {
			t.Errorf("volume %s twice", v.Name)
		}
		volumes[v.Name] = v
	}
	known := []corev1.HostPathType{corev1.HostPathUnset, corev1.HostPathDirectoryOrCreate,
		corev1.HostPathDirectory, corev1.HostPathFileOrCreate, corev1.HostPathFile,
		corev1.HostPathSocket, corev1.HostPathCharDev, corev1.HostPathBlockDev}
	used := map[string]bool{}
	paths := map[string]bool{}
	for _, m := range spec.Containers[0].VolumeMounts {
		v, ok := volumes[m.Name]
		if !ok {
			t.Errorf("mount %s: no volume named %s", m.MountPath, m.Name)
			continue
		}
		used[m.Name] = true
		if !strings.HasPrefix(m.MountPath, "/") || paths[m.MountPath] {
			t.Errorf("mountPath %q: not absolute, or mounted twice", m.MountPath)
		}
		paths[m.MountPath] = true
		if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional {
			t.Errorf("mount %s: Bidirectional propagation needs a privileged container", m.MountPath)
		}
		if hp := v.HostPath; hp != nil {
			if !strings.HasPrefix(hp.Path, "/") {
				t.Errorf("volume %s: hostPath %q is not absolute", v.Name, hp.Path)
			}
			if hp.Type != nil && !slices.Contains(known, *hp.Type) {
				t.Errorf("volume %s: hostPath type %q", v.Name, *hp.Type)
			}
		}
	}
	for name := range volumes {
		if !used[name] {
			t.Errorf("volume %s is not mounted", name)
		}
	}
}

// What docs/kubernetes.md says of it: not privileged, every capability dropped but
// the four the forwarder uses, no escalation, a read-only root, the
// runtime's seccomp profile, and rolling updates that hand over (a new pod
// beside the old one, at a hand-off socket on a host mount).
func TestSecurityAndUpdateAreAsDocumented(t *testing.T) {
	ds := load(t)
	c := ds.Spec.Template.Spec.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil || sc.SeccompProfile == nil {
		t.Fatal("securityContext, its capabilities and seccompProfile must be set")
	}
	is := func(p *bool, want bool) bool { return p != nil && *p == want }
	if !is(sc.Privileged, false) || !is(sc.AllowPrivilegeEscalation, false) ||
		!is(sc.ReadOnlyRootFilesystem, true) {
		t.Errorf("privileged %v, allowPrivilegeEscalation %v, readOnlyRootFilesystem %v",
			sc.Privileged, sc.AllowPrivilegeEscalation, sc.ReadOnlyRootFilesystem)
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("capabilities.drop %v, want [ALL]", sc.Capabilities.Drop)
	}
	add := slices.Clone(sc.Capabilities.Add)
	slices.Sort(add)
	if want := []corev1.Capability{"DAC_OVERRIDE", "SETGID", "SETPCAP", "SETUID"}; !slices.Equal(add, want) {
		t.Errorf("capabilities.add %v, want %v", add, want)
	}
	if sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("seccompProfile %q", sc.SeccompProfile.Type)
	}
	if !slices.Contains(c.Args, "--kata-host") {
		t.Errorf("args %v lack --kata-host", c.Args)
	}
	u := ds.Spec.UpdateStrategy
	if u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxSurge == nil || u.RollingUpdate.MaxSurge.IntValue() != 1 ||
		u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 0 {
		t.Errorf("updateStrategy %+v, want RollingUpdate with maxSurge 1, maxUnavailable 0", u)
	}
}
