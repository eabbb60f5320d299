{{/* The chart's name, or nameOverride. */}}
{{- define "tidepool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else the release name
when it already holds the chart's name, else "<release>-<chart>".
*/}}
{{- define "tidepool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := include "tidepool.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names of the four parts; each is also the name of its ServiceAccount. */}}
{{- define "tidepool.operator" -}}{{ include "tidepool.fullname" . }}-operator{{- end }}
{{- define "tidepool.agent" -}}{{ include "tidepool.fullname" . }}-agent{{- end }}
{{- define "tidepool.session" -}}{{ include "tidepool.fullname" . }}-session{{- end }}
{{- define "tidepool.gateway" -}}{{ include "tidepool.fullname" . }}-gateway{{- end }}

{{/* The gateway's Kubernetes user name, which the operator leaves uncapped. */}}
{{- define "tidepool.gatewayUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ include "tidepool.gateway" . }}
{{- end }}

{{/* The Secret holding the API's bearer token. */}}
{{- define "tidepool.apiTokenSecret" -}}
{{- .Values.apiToken.existingSecret | default (printf "%s-api-token" (include "tidepool.fullname" .)) }}
{{- end }}

{{/* The operator's URL inside the cluster, for agents and session pods. */}}
{{- define "tidepool.operatorURL" -}}
http://{{ include "tidepool.operator" . }}.{{ .Release.Namespace }}.svc:{{ int .Values.service.port }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tidepool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tidepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator pods' selector. */}}
{{- define "tidepool.operatorSelector" -}}
app.kubernetes.io/name: {{ include "tidepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The gateway pods' selector. */}}
{{- define "tidepool.gatewaySelector" -}}
app.kubernetes.io/name: {{ include "tidepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* An image reference: (list $ "name"). */}}
{{- define "tidepool.image" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $tag := $root.Values.images.tag | default $root.Chart.AppVersion }}
{{- with $root.Values.images.registry }}{{ trimSuffix "/" . }}/{{ end }}{{ $name }}:{{ $tag }}
{{- end }}

{{/* imagePullSecrets for a ServiceAccount. */}}
{{- define "tidepool.pullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator works in, as JSON: rbac.namespaces, else the
release namespace; none (the whole cluster) with rbac.clusterWide.
*/}}
{{- define "tidepool.namespaces" -}}
{{- if .Values.rbac.clusterWide }}
{{- list | toJson }}
{{- else }}
{{- .Values.rbac.namespaces | default (list .Release.Namespace) | toJson }}
{{- end }}
{{- end }}

{{/*
The namespaces the gateway serves, as JSON: gateway.namespaces, else the
operator's; with rbac.clusterWide, the session namespace. The gateway
watches each one by name, so it needs a list even when the operator has none.
*/}}
{{- define "tidepool.gatewayNamespaces" -}}
{{- if .Values.gateway.namespaces }}
{{- .Values.gateway.namespaces | toJson }}
{{- else if .Values.rbac.clusterWide }}
{{- list (.Values.operator.sessionNamespace | default .Release.Namespace) | toJson }}
{{- else }}
{{- include "tidepool.namespaces" . }}
{{- end }}
{{- end }}

{{/*
Refuses values that contradict each other, with a message that names them.
Each template that depends on these values includes it.
*/}}
{{- define "tidepool.checkValues" -}}
{{- if .Values.rbac.poolNamespaces }}
{{- fail "rbac.poolNamespaces is replaced by rbac.namespaces: the operator now works only in the namespaces listed there (pods, sessions and key Secrets alike); list your pool namespaces in rbac.namespaces, or set rbac.clusterWide=true" }}
{{- end }}
{{- if and .Values.network.policies.enabled (not .Values.network.clusterCIDRs) }}
{{- fail "network.policies needs network.clusterCIDRs: without the cluster's ranges, session pods could reach every pod and Service" }}
{{- end }}
{{- $actions := .Values.admissionPolicy.validationActions }}
{{- if and (has "Deny" $actions) (has "Warn" $actions) }}
{{- fail "admissionPolicy.validationActions: Deny and Warn may not be used together (a denied request needs no warning)" }}
{{- end }}
{{- if and .Values.rbac.clusterWide .Values.rbac.namespaces }}
{{- fail "rbac.clusterWide and rbac.namespaces exclude each other: clusterWide already covers every namespace" }}
{{- end }}
{{- if not .Values.rbac.clusterWide }}
{{- $namespaces := include "tidepool.namespaces" . | fromJsonArray }}
{{- $sessions := .Values.operator.sessionNamespace | default .Release.Namespace }}
{{- if not (has $sessions $namespaces) }}
{{- fail (printf "operator.sessionNamespace (%s) must be one of rbac.namespaces %v" $sessions $namespaces) }}
{{- end }}
{{- if and .Values.examplePool.enabled (not (has .Release.Namespace $namespaces)) }}
{{- fail (printf "examplePool is in the release namespace %s, which rbac.namespaces %v does not list: list it, or set examplePool.enabled=false" .Release.Namespace $namespaces) }}
{{- end }}
{{- if .Values.gateway.enabled }}
{{- range .Values.gateway.namespaces }}
{{- if not (has . $namespaces) }}
{{- fail (printf "gateway.namespaces lists %s, which is not one of the operator's namespaces %v (rbac.namespaces)" . $namespaces) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.gateway.enabled }}
{{- $sessions := .Values.operator.sessionNamespace | default .Release.Namespace }}
{{- $served := include "tidepool.gatewayNamespaces" . | fromJsonArray }}
{{- if not (has $sessions $served) }}
{{- fail (printf "the gateway's session namespace %s (operator.sessionNamespace) must be one of gateway.namespaces %v" $sessions $served) }}
{{- end }}
{{- with .Values.gateway.httpRoute }}
{{- if and .enabled (not .parentRefs) }}
{{- fail "gateway.httpRoute.parentRefs must name the Gateway the route attaches to" }}
{{- end }}
{{- end }}
{{- with .Values.gateway.autoscaling }}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must be at most gateway.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What the operator does in each namespace it works in: a Role there, or the
ClusterRole with rbac.clusterWide. docs/operating.md lists them too.
*/}}
{{- define "tidepool.namespacedRules" -}}
# Warm pods: watched by label, created and deleted by the pool controller,
# claimed with a merge patch by the session controller.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, patch, delete]
# Each pool's signing keys, in the Secret <pool>-session-key beside the pool:
# read by name, created once, updated to rotate. Never listed or watched, so
# no other Secret is seen in bulk.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, update]
# Events on pools and sessions (the events.k8s.io API the client uses).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Pools: read and cached; their status written.
- apiGroups: [tidepool.dev]
  resources: [warmpools]
  verbs: [get, list, watch]
- apiGroups: [tidepool.dev]
  resources: [warmpools/status]
  verbs: [patch]
# Pods and key Secrets are owned by their pool with blockOwnerDeletion;
# clusters with the OwnerReferencesPermissionEnforcement admission plugin
# ask for this before they accept such an owner.
- apiGroups: [tidepool.dev]
  resources: [warmpools/finalizers]
  verbs: [update]
# Sessions: created by the API, cached, deleted by the API and after
# retention; their status written by the controller and the results route.
- apiGroups: [tidepool.dev]
  resources: [testsessions]
  verbs: [get, list, watch, create, delete]
- apiGroups: [tidepool.dev]
  resources: [testsessions/status]
  verbs: [patch]
# Monitors: read, their status written; each run is a session the monitor
# owns with blockOwnerDeletion, as a pool owns its pods.
- apiGroups: [tidepool.dev]
  resources: [monitors]
  verbs: [get, list, watch]
- apiGroups: [tidepool.dev]
  resources: [monitors/status]
  verbs: [patch]
- apiGroups: [tidepool.dev]
  resources: [monitors/finalizers]
  verbs: [update]
# Tubes: created and deleted by the API, cached; the controller writes their
# status and its finalizer (a patch), and owns each pool tube's session
# with blockOwnerDeletion.
- apiGroups: [tidepool.dev]
  resources: [tubes]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [tidepool.dev]
  resources: [tubes/status]
  verbs: [patch]
- apiGroups: [tidepool.dev]
  resources: [tubes/finalizers]
  verbs: [update]
{{- end }}
